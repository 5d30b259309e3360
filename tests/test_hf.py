"""transformers ViT/DeiT: the same patch() as timm, and equivalence with timm on the same weights."""

import pytest
import torch
import transformers

import tokenpatch
from tokenpatch import TokenPatchError, UnsupportedModelError
from tokenpatch.training.finetune import head_features

from conftest import METHOD_CASES, case_id, images, make_model
from hf_convert import compare_patched, hf_twin

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
             patch_size=16, num_labels=5)
HF_MODELS = {
    "ViTModel": (transformers.ViTModel, transformers.ViTConfig),
    "ViTForImageClassification": (transformers.ViTForImageClassification, transformers.ViTConfig),
    "DeiTModel": (transformers.DeiTModel, transformers.DeiTConfig),
    "DeiTForImageClassification": (transformers.DeiTForImageClassification, transformers.DeiTConfig),
    "DeiTForImageClassificationWithTeacher": (transformers.DeiTForImageClassificationWithTeacher, transformers.DeiTConfig),
}
# A method with modules of its own (dynamicvit's predictors, iared2's interpreters) initialises them at
# random per model, so only the others can be compared across backends.
VARIANTS = [case for case in METHOD_CASES if not tokenpatch.patch(make_model("deit_tiny"), case[0])._modules.get(
    "tokenpatch")]


def build(name, **config):
    torch.manual_seed(0)
    model_class, config_class = HF_MODELS[name]
    return model_class(config_class(**{**SMALL, **config})).eval()


def main_output(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.mark.parametrize("name", HF_MODELS)
@pytest.mark.parametrize("variant", METHOD_CASES, ids=case_id)
def test_keep_ratio_one_and_unpatch_are_exact(name, variant):
    method, options = variant
    model = build(name)
    x = torch.randn(2, 3, 64, 64)
    reference = main_output(model(x))
    tokenpatch.patch(model, method, keep_ratio=1.0, **options)
    assert (main_output(model(x)) - reference).abs().max() <= 1e-5
    tokenpatch.set_keep_ratio(model, 0.5)
    with tokenpatch.trace(model) as t:
        reduced = main_output(model(x))
    assert t.tokens_per_block[-1] < t.tokens_per_block[0]
    assert torch.isfinite(reduced).all()
    tokenpatch.unpatch(model)
    assert torch.equal(main_output(model(x)), reference)


def test_state_dict_unchanged_and_prefix_tokens_protected():
    model = build("DeiTForImageClassificationWithTeacher")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokenpatch.patch(model, "evit", keep_ratio=0.3)
    with tokenpatch.trace(model) as t:
        model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(r.positions[:, :2], torch.tensor([[0, 1], [0, 1]])) for r in t.records)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_labels_interpolated_positions_and_hidden_states():
    model = tokenpatch.patch(build("ViTForImageClassification"), "evit", keep_ratio=0.5)
    out = model(torch.randn(3, 3, 64, 64), labels=torch.tensor([0, 1, 2]), output_hidden_states=True)
    assert out.loss is not None and torch.isfinite(out.loss)
    # hidden_states[i] is the input of block i (then the last block's output): every one the full grid.
    assert [h.shape[1] for h in out.hidden_states] == [17] * 5
    reduced = tokenpatch.patch(build("ViTForImageClassification"), "evit", keep_ratio=0.5, outputs="reduced")
    out = reduced(torch.randn(3, 3, 64, 64), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [17, 17, 9, 5, 3]  # with outputs="reduced" they shrink
    bigger = model(torch.randn(1, 3, 96, 96), interpolate_pos_encoding=True)
    assert bigger.logits.shape == (1, 5)


def test_output_attentions_is_a_clear_error():
    model = tokenpatch.patch(build("ViTForImageClassification"), "idle", keep_ratio=0.5)
    with pytest.raises(TokenPatchError, match="output_attentions is not supported"):
        model(torch.randn(1, 3, 64, 64), output_attentions=True)


def test_unsupported_transformers_model_is_left_untouched():
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[2])
    model = transformers.SwinModel(config)
    with pytest.raises(UnsupportedModelError, match=r"cannot patch SwinModel.*transformers \(5.x\) ViT, DeiT, CLIP"):
        tokenpatch.patch(model, "idle")
    assert not tokenpatch.is_patched(model)


@pytest.mark.parametrize("key", ["deit_tiny", "deit_tiny_distilled"])
@pytest.mark.parametrize("variant", VARIANTS, ids=case_id)
def test_timm_and_transformers_agree_on_the_same_weights(key, variant):
    method, options = variant
    timm_model = make_model(key)
    hf_model = hf_twin(timm_model)
    x = images(timm_model, batch=3)
    assert (hf_model(x).logits - timm_model(x)).abs().max() <= 1e-4
    same_tokens, max_diff = compare_patched(timm_model, hf_model, x, method, 0.5, options)
    assert same_tokens
    assert max_diff <= 1e-4


def test_unexpected_layer_layout_names_the_expected_modules():
    model = build("ViTForImageClassification")
    del model.vit.layers[1].attention.q_proj
    with pytest.raises(UnsupportedModelError, match=r"layers\[1\] \(ViTLayer\) lacks \['attention.q_proj'\]"):
        tokenpatch.patch(model, "idle")
    assert not tokenpatch.is_patched(model)


@pytest.mark.parametrize("method", ["idle", "evit"])
def test_train_mode_gradients_reach_every_parameter(method):
    model = build("DeiTForImageClassification", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    tokenpatch.patch(model, method, keep_ratio=0.5).train()
    out = model(torch.randn(4, 3, 64, 64), labels=torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", [n for n in HF_MODELS if n != "DeiTForImageClassificationWithTeacher"])
def test_head_features_feed_the_classifier_or_name_the_missing_head(name):
    model = tokenpatch.patch(build(name), "idle", keep_ratio=0.5)
    x = torch.randn(2, 3, 64, 64)
    if not hasattr(model, "classifier"):
        with pytest.raises(TokenPatchError, match="no classification head"):
            with head_features(model):
                pass
        return
    with head_features(model) as seen:
        logits = model(x).logits
    assert torch.allclose(model.classifier(seen[0]), logits)
