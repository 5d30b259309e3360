"""MAC counting: published baselines, SDPA handle, and monotonicity in keep_ratio."""

import pytest
import timm
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenpatch
from tokenpatch.measure.flops import count_macs

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
    method=st.sampled_from(["idle", "evit", "tome"]),
    # up to 0.95: tome merging a single token in a late block costs more in matching than it saves
    ratios=st.lists(st.floats(0.05, 0.95), min_size=2, max_size=4, unique=True),
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


@pytest.mark.parametrize("method, options", [("dynamicvit", {}), ("sait", {}), ("iared2", {"threshold": None}),
                                              ("ats", {})])
def test_learned_and_adaptive_methods_count_fewer_macs_at_lower_keep_ratios(method, options):
    model = make_model("deit_tiny", depth=4, img_size=96)
    unpatched = count_macs(model, (1, 3, 96, 96)).total
    tokenpatch.patch(model, method, keep_ratio=0.3, **options)
    macs = []
    for r in (0.3, 0.5, 0.7, 0.9):
        tokenpatch.set_keep_ratio(model, r)
        macs.append(count_macs(model, (1, 3, 96, 96)).total)
    assert macs == sorted(macs) and len(set(macs)) == 4
    assert macs[1] < unpatched  # dynamicvit's predictors and iared2's interpreters are counted too


def test_report_lists_token_ops_counted_as_zero():
    model = tokenpatch.patch(make_model("deit_tiny"), "evit", keep_ratio=0.5, fuse=True)
    report = count_macs(model, (1, 3, 64, 64))
    assert {"aten::topk", "aten::gather"} <= set(report.ignored_ops)
    assert report.tokens_per_block == [17, 10, 7, 5]
    assert sum(report.per_block) < report.total


def closed_form_macs(c, n_patches, prefix, classes, blocks, patch=16, fused_tokens=(), head_size=64):
    """fvcore's count of a timm ViT written out by hand.

    ``blocks`` lists, per block, ``(kind, tokens_in, tokens_mlp)``: ``"full"``, ``"idle_first"``
    (scores from all keys, then q/v on the selected tokens), ``"idle"``, ``"idle_merged"`` (keys of
    all, each idle token matched to a selected one on head-mean keys, then a whole block on the m
    merged tokens; the ranking not included), or ``"evit"``.
    Linear and matmul terms count multiply-adds; LayerNorm counts 5 per element as fvcore does.
    """
    total = n_patches * c * 3 * patch * patch  # patch embedding conv
    for kind, n, m in blocks:
        if kind == "full":
            total += 12 * n * c * c + 2 * n * n * c + 10 * n * c
        elif kind == "idle":
            total += 12 * m * c * c + 2 * m * m * c + 10 * m * c
        elif kind == "idle_first":
            total += 5 * n * c + n * c * c + c * c + n * c  # norm all, keys all, class query, scores
            total += 11 * m * c * c + 2 * m * m * c + 5 * m * c  # q, v, attention, proj, mlp, norm2
        elif kind == "idle_merged":
            total += 5 * n * c + n * c * c + (n - m) * m * head_size  # norm all, keys all, matching
            total += 12 * m * c * c + 2 * m * m * c + 10 * m * c  # a whole block on the merged tokens
        elif kind == "evit":
            total += 5 * n * c + 2 * n * c * c + c * c + n * c  # norm, keys and values of all n, class query, scores
            total += m * c * c + 2 * m * n * c + m * c * c + 8 * m * c * c + 5 * m * c  # q, attention, proj, mlp of the kept m
    final_tokens = blocks[-1][2]
    return total + 5 * final_tokens * c + c * classes


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8])
def test_counts_match_closed_form(ratio):
    import math

    c, n, prefix, classes = 192, 16, 1, 10
    model = make_model("deit_tiny", depth=4)
    assert count_macs(model, (1, 3, 64, 64)).total == closed_form_macs(
        c, n, prefix, classes, [("full", n + 1, n + 1)] * 4)

    tokenpatch.patch(model, "idle", keep_ratio=ratio, start_block=1, schedule="constant", score="fixed",
                     idle_update="unchanged")
    m = prefix + int(ratio * n)
    expected = closed_form_macs(c, n, prefix, classes, [("full", 17, 17), ("idle_first", 17, m), ("idle", 17, m), ("idle", 17, m)])
    # idle tokens stay in the sequence: the final norm runs on all of them.
    expected += 5 * (n + 1 - m) * c
    assert count_macs(model, (1, 3, 64, 64)).total == expected
    tokenpatch.set_options(model, score="fresh")  # the official rule scores afresh in every idle block
    fresh = closed_form_macs(c, n, prefix, classes, [("full", 17, 17)] + [("idle_first", 17, m)] * 3) + 5 * (n + 1 - m) * c
    assert count_macs(model, (1, 3, 64, 64)).total == fresh
    tokenpatch.set_options(model, idle_update="merged", score=None)  # the default: merged, first ranking kept
    merged = closed_form_macs(c, n, prefix, classes, [("full", 17, 17)] + [("idle_merged", 17, m)] * 3,
                              head_size=64) + 5 * (n + 1 - m) * c
    assert count_macs(model, (1, 3, 64, 64)).total == merged + c * c + 17 * c  # the first block ranks, once
    tokenpatch.unpatch(model)

    tokenpatch.patch(model, "evit", keep_ratio=ratio, drop_blocks=(1, 2))
    k1 = math.ceil(ratio * n)
    k2 = math.ceil(ratio * k1)
    # only the kept tokens' attention rows are computed (queries, attention, projection)
    blocks = [("full", 17, 17), ("evit", 17, 1 + k1), ("evit", 1 + k1, 1 + k2), ("full", 1 + k2, 1 + k2)]
    assert count_macs(model, (1, 3, 64, 64)).total == closed_form_macs(c, n, prefix, classes, blocks)


@pytest.mark.parametrize("ratio, published", [(0.9, 4.0), (0.8, 3.5), (0.7, 3.0), (0.6, 2.6), (0.5, 2.3)])
def test_evit_fuse_reproduces_published_deit_small_macs(ratio, published):
    model = tokenpatch.patch(timm.create_model("deit_small_patch16_224", pretrained=False), "evit",
                             keep_ratio=ratio, fuse=True)
    assert count_macs(model).gmacs == pytest.approx(published, abs=0.05)


def test_counting_prints_nothing(capfd):
    model = tokenpatch.patch(make_model("deit_tiny"), "idle", keep_ratio=0.5)
    count_macs(model, (1, 3, 64, 64))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
