"""MAC counting: published baselines, SDPA handle, and monotonicity in keep_ratio."""

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenpatch
from tokenpatch.flops import count_macs

from conftest import make_model


@pytest.mark.parametrize(
    "name, gmacs", [("deit_tiny_patch16_224", 1.26), ("deit_small_patch16_224", 4.61), ("deit_base_patch16_224", 17.58)]
)
def test_unpatched_deit_matches_published_macs(name, gmacs):
    report = count_macs(timm.create_model(name, pretrained=False))
    assert report.gmacs == pytest.approx(gmacs, rel=0.01)
    assert "aten::scaled_dot_product_attention" not in report.ignored_ops


def test_sdpa_handle_agrees_with_unfused_attention():
    fused = make_model("deit_small")
    unfused = make_model("deit_small")
    for block in unfused.blocks:
        block.attn.fused_attn = False
    assert count_macs(fused, (2, 3, 64, 64)).total == pytest.approx(count_macs(unfused, (2, 3, 64, 64)).total, rel=1e-3)


@settings(max_examples=10, deadline=None)
@given(
    method=st.sampled_from(["idle", "evit"]),
    ratios=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4, unique=True),
    key=st.sampled_from(["deit_tiny", "deit_tiny_distilled"]),
)
def test_macs_fall_monotonically_with_keep_ratio(method, ratios, key):
    model = tokenpatch.patch(make_model(key, depth=4, img_size=96), method, keep_ratio=1.0)
    macs = []
    for r in sorted(ratios):
        tokenpatch.set_keep_ratio(model, r)
        macs.append(count_macs(model, (1, 3, 96, 96)).total)
    assert macs == sorted(macs)
    tokenpatch.unpatch(model)
    assert count_macs(model, (1, 3, 96, 96)).total >= macs[-1]


def test_report_lists_token_ops_counted_as_zero():
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.5, fuse=True)
    report = count_macs(model, (1, 3, 64, 64))
    assert {"aten::topk", "aten::gather"} <= set(report.ignored_ops)
    assert report.tokens_per_block == [17, 10, 7, 5]
    assert sum(report.per_block) < report.total
