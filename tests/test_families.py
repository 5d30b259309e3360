"""Every timm family beyond ViT/DeiT: EVA-02, DINOv3, RoPE ViTs, Perception Encoder, BEiT, relpos, SigLIP, gap."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenpatch
from tokenpatch import InvalidOptionError
from tokenpatch.core.pieces import full_block

from conftest import FAMILY_MODELS, METHOD_CASES, block_calls, case_id, make_family_model

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILY_MODELS)
def test_pieces_compose_to_the_original_block(family):
    model = make_family_model(family)
    backend, calls = block_calls(model, lambda m: m(X))
    for block, x, extra in calls:
        with torch.no_grad():
            assert torch.allclose(full_block(backend.view(block, extra), x), block(x, **extra), atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILY_MODELS if "rope" in f or "rel" in f or "beit" in f
                                    or "eva" in f or f in ("dinov3", "perception_encoder")])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_tokens_carry_their_positions_through_a_block(family, seed):
    # Shuffle the patches and say where each came from: a block that follows positions (rotary
    # rows, bias rows and columns) gives the shuffled output of the original order.
    model = make_family_model(family)
    backend, calls = block_calls(model, lambda m: m(X))
    block, x, extra = calls[1]
    p = model.num_prefix_tokens
    order = torch.cat([torch.arange(p), p + torch.randperm(x.shape[1] - p, generator=torch.Generator().manual_seed(seed))])
    positions = order.expand(x.shape[0], -1)
    with torch.no_grad():
        shuffled = full_block(backend.view(block, extra), x[:, order], positions)
        assert torch.allclose(shuffled, block(x, **extra)[:, order], atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_MODELS)
@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_keep_one_is_exact_reductions_run_and_unpatch_restores(family, case):
    model = make_family_model(family)
    with torch.no_grad():
        reference, features = model(X), model.forward_features(X)
    try:
        tokenpatch.patch(model, case[0], keep_ratio=1.0, **case[1])
    except InvalidOptionError as refusal:  # padded per-image counts on a model that pools every token
        assert "pools over all tokens" in str(refusal) and "\n" not in str(refusal)
        assert not tokenpatch.is_patched(model) and model.global_pool != "token"
        return
    with torch.no_grad():
        assert torch.equal(model(X), reference)
        tokenpatch.set_keep_ratio(model, 0.5)
        with tokenpatch.trace(model) as t:
            reduced = model(X)
        dense = model.forward_features(X)
    assert torch.isfinite(reduced).all() and not torch.allclose(reduced, reference, atol=1e-4)
    assert min(t.tokens_per_block) < t.tokens_per_block[0] or case[0] == "idle"
    assert dense.shape == features.shape  # dense callers still get every token
    tokenpatch.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(X), reference)


@pytest.mark.parametrize("family", ["siglip_map_head", "gap_registers", "rope_gap_register", "relpos"])
def test_models_without_a_class_token_score_by_the_mean_query(family):
    model = tokenpatch.patch(make_family_model(family), "evit", keep_ratio=0.5)
    with tokenpatch.trace(model) as t:
        model(X)
    assert {s.name for s in t.scores} == {"mean_query_attention"}
    with pytest.raises(InvalidOptionError, match="scorer='class_token' needs a class token"):
        tokenpatch.set_options(model, scorer="class_token")


def test_naflex_patch_dictionaries_are_refused_clearly():
    model = tokenpatch.patch(make_family_model("naflex_gap"), "evit")
    patches = {"patches": torch.randn(2, 16, 768), "patch_coord": torch.zeros(2, 16, 2, dtype=torch.long),
               "patch_valid": torch.ones(2, 16, dtype=torch.bool)}
    with pytest.raises(tokenpatch.InputShapeError, match=r"expected an image tensor of shape \(B, C, H, W\), got dict"):
        model(patches)
