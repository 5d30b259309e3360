"""Dense outputs: callers that read tokens get the full grid; the head keeps each method's own tokens."""

import pytest
import torch
import transformers

import tokenpatch
from tokenpatch import InvalidOptionError, TokenPatchError

from conftest import images, make_model

HF_SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=64,
                patch_size=16, num_labels=5)


def test_a_dropped_token_keeps_the_state_it_left_with():
    # EViT drops after the attention residual of block 2: a dropped token's grid row is that state.
    model = make_model("deit_tiny")
    x = images(model, batch=2)
    (patches, prefix), = model.forward_intermediates(x, indices=[1], output_fmt="NLC", return_prefix_tokens=True,
                                                     intermediates_only=True)
    before, block = torch.cat([prefix, patches], dim=1), model.blocks[2]
    expected = before + block.drop_path1(block.ls1(block.attn(block.norm1(before))))
    tokenpatch.patch(model, "evit", keep_ratio=0.5, drop_blocks=(2,))
    with tokenpatch.trace(model) as t:
        grid, = model.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True)
    kept = t.records[2].positions[:, 1:] - 1  # patch indices computed on after block 2
    dropped = torch.ones(2, 16, dtype=torch.bool).scatter(1, kept, False)
    assert dropped.sum() == 2 * 8
    assert torch.allclose(grid[dropped], expected[:, 1:][dropped], atol=1e-5)
    assert not torch.allclose(grid[~dropped], expected[:, 1:][~dropped], atol=1e-3)  # the kept ones went on


def test_a_merged_token_is_copied_to_every_patch_it_stands_for():
    model = tokenpatch.patch(make_model("deit_tiny"), "tome", keep_ratio=0.4)
    x = images(model, batch=2)
    with tokenpatch.trace(model) as t:
        grid = model.forward_features(x)
    groups = t.records[-1].groups  # (B, 16): the final token carrying each patch
    assert groups.unique().numel() < 16
    for b in range(2):
        for token in groups[b].unique():
            rows = grid[b, 1:][groups[b] == token]
            assert torch.equal(rows, rows[:1].expand_as(rows))


@pytest.mark.parametrize("method", ["idle", "evit", "tome", "dynamicvit"])
def test_an_average_pooling_head_sees_the_methods_own_tokens(method):
    x = images(make_model("avg_pool"), batch=2)
    full = tokenpatch.patch(make_model("avg_pool"), method, keep_ratio=0.5)
    reduced = tokenpatch.patch(make_model("avg_pool"), method, keep_ratio=0.5, outputs="reduced")
    # the classifier pools what the method left, whatever dense callers are given
    assert torch.allclose(full(x), reduced.forward_head(reduced.forward_features(x)), atol=1e-5)
    assert full.forward_features(x).shape[1] == 17


def test_reduced_outputs_and_their_positions():
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.5, drop_blocks=(1,), outputs="reduced")
    with pytest.raises(TokenPatchError, match="has not run"):
        tokenpatch.output_positions(model)
    tokens = model.forward_features(images(model, batch=2))
    positions = tokenpatch.output_positions(model)
    assert tokens.shape[1] == positions.shape[1] == 1 + 8
    assert (positions[:, 0] == 0).all() and (positions[:, 1:] >= 1).all()
    full = tokenpatch.patch(make_model("deit_tiny"), "evit")
    with pytest.raises(TokenPatchError, match='outputs="reduced"'):
        tokenpatch.output_positions(full)


def test_an_unknown_outputs_value_is_refused_and_leaves_the_model_unpatched():
    model = make_model("deit_tiny")
    with pytest.raises(InvalidOptionError, match="outputs must be one of full, reduced, got 'sparse'"):
        tokenpatch.patch(model, "evit", outputs="sparse")
    assert not tokenpatch.is_patched(model)


@pytest.mark.parametrize("method", ["evit", "tome", "sait"])
def test_transformers_hidden_states_are_full_and_the_logits_unchanged(method):
    torch.manual_seed(0)
    base = transformers.ViTModel(transformers.ViTConfig(**HF_SMALL)).eval()
    classifier = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_SMALL)).eval()
    x = torch.randn(2, 3, 64, 64)
    for model in (base, classifier):
        tokenpatch.patch(model, method, keep_ratio=0.5)
    output = base(x, output_hidden_states=True)
    assert output.last_hidden_state.shape == (2, 17, 64)
    assert [tuple(h.shape) for h in output.hidden_states] == [(2, 17, 64)] * 5
    assert torch.allclose(base(x).last_hidden_state, output.last_hidden_state, atol=1e-5)
    logits = classifier(x).logits
    with_states = classifier(x, output_hidden_states=True)
    assert torch.allclose(with_states.logits, logits, atol=1e-5)
    assert [tuple(h.shape) for h in with_states.hidden_states] == [(2, 17, 64)] * 5
