"""transformers vision encoders beyond ViT/DeiT: CLIP, SigLIP, SigLIP 2, DINOv2 (+registers), DINOv3, BEiT, Data2Vec, I-JEPA, ViT-MAE, ViT-MSN."""

import contextlib

import pytest
import timm
import torch
import transformers as T

import tokenpatch
from tokenpatch import InvalidOptionError
from tokenpatch.core.pieces import full_block

from conftest import METHOD_CASES, block_calls, case_id
from hf_convert import beit_twin, clip_twin, dinov2_twin, siglip_twin

VISION = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
              patch_size=16)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

# name -> (build, prefix tokens, class token)
MODELS = {
    "CLIPVisionModel": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**VISION)), 1, True),
    "CLIPVisionModelWithProjection": (lambda: T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**VISION)), 1, True),
    "CLIPModel": (lambda: T.CLIPModel(T.CLIPConfig(vision_config=VISION, text_config=TEXT)), 1, True),
    "SiglipVisionModel": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**VISION)), 0, False),
    "SiglipForImageClassification": (lambda: T.SiglipForImageClassification(
        T.SiglipConfig(vision_config=VISION, text_config=TEXT, num_labels=5)), 0, False),
    "Siglip2VisionModel": (lambda: T.Siglip2VisionModel(T.Siglip2VisionConfig(
        **{k: v for k, v in VISION.items() if k != "image_size"}, num_patches=16)), 0, False),
    "Siglip2ForImageClassification": (lambda: T.Siglip2ForImageClassification(T.Siglip2Config(
        vision_config={**{k: v for k, v in VISION.items() if k != "image_size"}, "num_patches": 16}, text_config=TEXT,
        num_labels=5)), 0, False),
    "Dinov2Model": (lambda: T.Dinov2Model(T.Dinov2Config(**VISION, layerscale_value=0.3)), 1, True),
    "Dinov2ForImageClassification": (lambda: T.Dinov2ForImageClassification(
        T.Dinov2Config(**VISION, layerscale_value=0.3, num_labels=5)), 1, True),
    "Dinov2WithRegistersModel": (lambda: T.Dinov2WithRegistersModel(
        T.Dinov2WithRegistersConfig(**VISION, layerscale_value=0.3, num_register_tokens=4)), 5, True),
    "DINOv3ViTModel": (lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**VISION, layerscale_value=0.3, num_register_tokens=4)),
                       5, True),
    "BeitModel": (lambda: T.BeitModel(T.BeitConfig(**VISION, layer_scale_init_value=0.3, use_relative_position_bias=True)),
                  1, True),
    "BeitModel_shared_bias": (lambda: T.BeitModel(T.BeitConfig(**VISION, layer_scale_init_value=0.3,
                                                                use_shared_relative_position_bias=True)), 1, True),
    "BeitForImageClassification": (lambda: T.BeitForImageClassification(
        T.BeitConfig(**VISION, layer_scale_init_value=0.3, use_relative_position_bias=True, num_labels=5)), 1, True),
    "Data2VecVisionModel": (lambda: T.Data2VecVisionModel(T.Data2VecVisionConfig(
        **VISION, layer_scale_init_value=0.3, use_relative_position_bias=True)), 1, True),
    "Data2VecVisionModel_shared_bias": (lambda: T.Data2VecVisionModel(T.Data2VecVisionConfig(
        **VISION, layer_scale_init_value=0.3, use_shared_relative_position_bias=True)), 1, True),
    "Data2VecVisionForImageClassification": (lambda: T.Data2VecVisionForImageClassification(T.Data2VecVisionConfig(
        **VISION, layer_scale_init_value=0.3, use_relative_position_bias=True, num_labels=5)), 1, True),
    "IJepaModel": (lambda: T.IJepaModel(T.IJepaConfig(**VISION)), 0, False),
    "IJepaForImageClassification": (lambda: T.IJepaForImageClassification(T.IJepaConfig(**VISION, num_labels=5)),
                                    0, False),
    "ViTMAEModel": (lambda: T.ViTMAEModel(T.ViTMAEConfig(**VISION, mask_ratio=0.0)), 1, True),
    "ViTMSNModel": (lambda: T.ViTMSNModel(T.ViTMSNConfig(**VISION)), 1, True),
    "ViTMSNForImageClassification": (lambda: T.ViTMSNForImageClassification(T.ViTMSNConfig(**VISION, num_labels=5)),
                                     1, True),
}


def siglip2_inputs():
    """SigLIP 2's patch sequences: the first image 4 x 4 patches, the second 3 x 4 plus 4 padding patches."""
    patches = X.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 16 * 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor([[4, 4], [3, 4]])}


def tokens_of(layer_output):
    """A layer's output tokens (Data2Vec layers return a tuple)."""
    return layer_output[0] if isinstance(layer_output, tuple) else layer_output


def build(name):
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    for key, table in model.named_parameters():
        if key.endswith("relative_position_bias_table"):  # initialised to zeros: give positions an effect
            torch.nn.init.normal_(table)
    return model


def run(model):
    """The model's main output on X: logits, else image embeddings, else the last hidden state."""
    inputs = {"pixel_values": X}
    if isinstance(model, T.CLIPModel):
        inputs["input_ids"] = torch.zeros(2, 3, dtype=torch.long)
    if isinstance(model, (T.Siglip2VisionModel, T.Siglip2ForImageClassification)):
        inputs = siglip2_inputs()
    if isinstance(model, T.ViTMAEModel):  # its random masking shuffles the patches: fix the noise
        inputs["noise"] = torch.rand(2, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(**inputs)
    for name in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name), output
    raise AssertionError(type(output))


@pytest.mark.parametrize("name", MODELS)
def test_prefix_class_token_and_pieces(name):
    model = build(name)
    backend, calls = block_calls(model, run)
    facts = backend.facts(model)
    assert (facts.num_prefix, facts.class_token, facts.depth) == (*MODELS[name][1:], 4)
    for layer, x, extra in calls:
        with torch.no_grad():
            assert torch.allclose(full_block(backend.view(layer, extra), x), tokens_of(layer(x, **extra)), atol=1e-5)


@pytest.mark.parametrize("name", ["DINOv3ViTModel", "BeitModel", "BeitModel_shared_bias", "Data2VecVisionModel",
                                  "Data2VecVisionModel_shared_bias"])
def test_tokens_carry_their_rotations_and_biases(name):
    # shuffled patches with their original positions give the shuffled output of the original order
    model = build(name)
    backend, calls = block_calls(model, run)
    layer, x, extra = calls[1]
    p = MODELS[name][1]
    order = torch.cat([torch.arange(p), p + torch.randperm(16, generator=torch.Generator().manual_seed(0))])
    with torch.no_grad():
        shuffled = full_block(backend.view(layer, extra), x[:, order], order.expand(2, -1))
        assert torch.allclose(shuffled, tokens_of(layer(x, **extra))[:, order], atol=1e-5)
        assert not torch.allclose(full_block(backend.view(layer, extra), x[:, order]), shuffled, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", [c for c in METHOD_CASES if not c[1]], ids=case_id)  # variants: timm suites
def test_keep_one_is_exact_reductions_run_dense_outputs_stay_full(name, case):
    model = build(name)
    reference, output = run(model)
    try:
        tokenpatch.patch(model, case[0], keep_ratio=1.0, **case[1])
    except InvalidOptionError as refusal:  # padded per-image counts on a model that pools every token
        assert "pools over all tokens" in str(refusal) and not tokenpatch.is_patched(model)
        return
    assert torch.equal(run(model)[0], reference)
    tokenpatch.set_keep_ratio(model, 0.5)
    with tokenpatch.trace(model) as t:
        reduced, reduced_output = run(model)
    assert torch.isfinite(reduced).all() and not torch.allclose(reduced, reference, atol=1e-4)
    assert min(t.tokens_per_block) < t.tokens_per_block[0] or case[0] == "idle"
    hidden = getattr(reduced_output, "last_hidden_state", None)
    if hidden is not None:
        assert hidden.shape == output.last_hidden_state.shape
    tokenpatch.unpatch(model)
    assert torch.equal(run(model)[0], reference)


def test_a_clip_models_text_layers_are_left_alone():
    model = tokenpatch.patch(build("CLIPModel"), "evit", keep_ratio=0.5)
    assert all("forward" not in layer.__dict__ for layer in model.text_model.encoder.layers)
    assert all("forward" in layer.__dict__ for layer in model.vision_model.encoder.layers)


TWIN_METHODS = [case for case in METHOD_CASES if case[0] not in ("dynamicvit", "iared2")]  # untrained modules differ


# timm model -> (timm name, image size, transformers twin, the twin's final tokens (timm's forward_features))
TWINS = {
    "dinov2": ("vit_small_patch14_dinov2", 56, dinov2_twin, lambda model, out: out.last_hidden_state),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", 56, dinov2_twin, lambda model, out: out.last_hidden_state),
    # transformers applies CLIP's post_layernorm to the pooled class token only
    "clip": ("vit_base_patch16_clip_224", 64, clip_twin, lambda model, out: model.post_layernorm(out.last_hidden_state)),
    "siglip": ("vit_base_patch16_siglip_224", 64, siglip_twin, lambda model, out: out.last_hidden_state),
    "beit": ("beit_base_patch16_224", 64, beit_twin, lambda model, out: out.last_hidden_state),
}


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("case", [None] + TWIN_METHODS, ids=lambda c: "unpatched" if c is None else case_id(c))
def test_timm_and_transformers_agree_on_the_same_weights(twin, case):
    name, size, make_twin, final_tokens = TWINS[twin]
    torch.manual_seed(0)
    extra = {"init_values": 0.3} if "dinov2" in name or "beit" in name else {}
    timm_model = timm.create_model(name, pretrained=False, depth=4, embed_dim=96, num_heads=4, img_size=size,
                                   num_classes=0, **extra).eval()
    for key, table in timm_model.named_parameters():
        if key.endswith("relative_position_bias_table"):  # near zero at init: give positions an effect
            torch.nn.init.normal_(table)
    hf_model = make_twin(timm_model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    traces = []
    for model in (timm_model, hf_model):
        if case is not None:
            try:
                tokenpatch.patch(model, case[0], keep_ratio=0.5, **case[1])
            except InvalidOptionError as refusal:  # padded counts under an attention or average pool: both refuse
                assert "pools over all tokens" in str(refusal)
                continue
        with torch.no_grad(), (tokenpatch.trace(model) if case else contextlib.nullcontext()) as recorded:
            if model is hf_model:
                output = model(pixel_values=x)
                tokens, pooled = final_tokens(model, output), output.pooler_output
            else:
                tokens = model.forward_features(x)
                pooled = model.forward_head(tokens, pre_logits=True)
        traces.append((tokens, pooled, recorded))
    if not traces:
        return
    (timm_tokens, timm_pooled, timm_trace), (hf_tokens, hf_pooled, hf_trace) = traces
    assert (timm_tokens - hf_tokens).abs().max() <= 1e-4
    assert (timm_pooled - hf_pooled).abs().max() <= 1e-4  # the pooled feature the heads read
    if case is not None:  # the same tokens chosen in every block
        assert all(torch.equal(a.positions, b.positions) for a, b in zip(timm_trace.records, hf_trace.records))


def test_siglip2_takes_patch_sequences_and_needs_full_outputs():
    model = tokenpatch.patch(build("Siglip2VisionModel"), "evit", keep_ratio=0.5)
    with pytest.raises(tokenpatch.InputShapeError, match=r"takes patch sequences pixel_values of shape \(B, N, C \* p \* p\)"):
        model(pixel_values=X)
    with torch.no_grad():
        padded, alone = model(**siglip2_inputs()), model(**{k: v[1:] for k, v in siglip2_inputs().items()})
    # the padding patches never reach a real token: the second image's tokens are the same alone
    assert torch.allclose(padded.last_hidden_state[1, :12], alone.last_hidden_state[0, :12], atol=1e-4)
    with pytest.raises(InvalidOptionError, match='needs outputs="full"'):
        tokenpatch.patch(build("Siglip2VisionModel"), "evit", outputs="reduced")
