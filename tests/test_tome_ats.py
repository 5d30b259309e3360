"""tome (bipartite soft matching, proportional attention) and ats (inverse-transform sampling)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenpatch
from tokenpatch.errors import InvalidOptionError
from tokenpatch.core.merging import bipartite_matching, merge_tokens
from tokenpatch.methods.ats import inverse_transform_sample, significance
from tokenpatch.methods.tome import keep_ratio_schedule

from conftest import images, make_model


# -- An independent reference of ToMe, written from the paper's definition (Bolya et al., ICLR 2023) --

def reference_bipartite_merge(x, sizes, metric, r):
    """One sample, plain Python loops: tokens alternate into A (even) and B (odd); every A token
    draws an edge to its most cosine-similar B token; the r strongest edges merge their A token
    into the B token (size-weighted mean). Returns the kept A tokens in order, then the B tokens."""
    a_ids, b_ids = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    unit = [m / m.norm() for m in metric]
    edges = []
    for a in a_ids:
        similarities = [float(unit[a] @ unit[b]) for b in b_ids]
        best = max(range(len(b_ids)), key=lambda j: similarities[j])  # first maximum on ties
        edges.append((similarities[best], a, b_ids[best]))
    strongest = sorted(edges, key=lambda e: -e[0])[:r]
    merged_into = {a: b for _, a, b in strongest}
    tokens, token_sizes = [], []
    for a in a_ids:
        if a not in merged_into:
            tokens.append(x[a])
            token_sizes.append(sizes[a])
    for b in b_ids:
        members = [b] + [a for a, into in merged_into.items() if into == b]
        total = sum(float(sizes[m]) for m in members)
        tokens.append(sum(x[m] * sizes[m] for m in members) / total)
        token_sizes.append(total)
    return torch.stack(tokens), torch.tensor(token_sizes)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 23), c=st.integers(1, 6), data=st.data())
def test_merge_matches_the_reference_bipartite_soft_matching(m, c, data):
    r = data.draw(st.integers(0, m // 2))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    x, metric = torch.randn(3, m, c, generator=g, dtype=torch.float64), torch.randn(3, m, 5, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 5, (3, m), generator=g).double()
    merged, merged_sizes = merge_tokens(x, sizes, bipartite_matching(metric, r))
    assert merged.shape == (3, m - r, c)
    for b in range(3):
        expected, expected_sizes = reference_bipartite_merge(x[b], sizes[b], metric[b], r)
        assert torch.allclose(merged[b], expected)
        assert torch.equal(merged_sizes[b], expected_sizes)


def reference_tome_logits(model, x, merges):
    """The whole DeiT forward with ToMe written out: explicit softmax attention with the log-size
    bias, then the reference merge of ``merges[i]`` patches after block i's attention."""
    tokens = model._pos_embed(model.patch_embed(x))
    p = model.num_prefix_tokens
    out = []
    for sample in tokens:
        t, sizes = sample, torch.ones(sample.shape[0])
        for block, r in zip(model.blocks, merges):
            attn = block.attn
            n = t.shape[0]
            q, k, v = attn.qkv(block.norm1(t)).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
            logits = (q @ k.transpose(-2, -1)) * attn.scale + sizes.log()
            o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, -1)
            t = t + block.ls1(attn.proj(o))
            if r:
                merged, merged_sizes = reference_bipartite_merge(t[p:], sizes[p:], k.mean(0)[p:], r)
                t, sizes = torch.cat([t[:p], merged]), torch.cat([sizes[:p], merged_sizes])
            t = t + block.ls2(block.mlp(block.norm2(t)))
        out.append(model.forward_head(model.norm(t[None])))
    return torch.cat(out)


@pytest.mark.parametrize("key", ["deit_tiny", "deit_tiny_distilled", "vit_reg4"])
@pytest.mark.parametrize("options", [{"r": 3}, {"keep_ratio": 0.5}])
def test_tome_model_equals_the_reference_forward(key, options):
    model = make_model(key, img_size=96 if key != "vit_reg4" else 56)
    x = images(model, batch=2)
    tokenpatch.patch(model, "tome", **options)
    with tokenpatch.trace(model) as t:
        logits = model(x)
    merges = [r.attention_tokens - r.mlp_tokens for r in t.records]
    assert sum(merges) > 0
    with torch.no_grad():
        assert torch.allclose(logits, reference_tome_logits(model, x, merges), atol=1e-4)


@pytest.mark.parametrize("key", ["deit_tiny_distilled", "vit_reg4"])
def test_tome_protects_prefix_tokens_and_groups_cover_every_patch(key):
    model = tokenpatch.patch(make_model(key, img_size=96 if key != "vit_reg4" else 56), "tome", r=4)
    p = model.num_prefix_tokens
    with tokenpatch.trace(model) as t:
        model(images(model, batch=2))
    patches = t.input_tokens - p
    for record in t.records:
        assert torch.equal(record.positions[:, :p], torch.arange(p).expand(2, p))
        groups, kept = record.groups, record.mlp_tokens - p
        assert groups.shape == (2, patches) and int(groups.max()) < kept
        for b in range(2):
            assert len(groups[b].unique()) == kept  # every token carries at least one patch
            representatives = record.positions[b, p:] - p
            assert torch.equal(groups[b, representatives], torch.arange(kept))  # a token's position is one of its members


def test_tome_r_schedule_and_keep_ratio_schedule():
    model = make_model("deit_tiny", depth=4, img_size=96)  # 36 patches
    tokenpatch.patch(model, "tome", r=5)
    with tokenpatch.trace(model) as t:
        model(images(model, batch=1))
    assert t.tokens_per_block == [37 - 5, 37 - 10, 37 - 15, 37 - 20]
    tokenpatch.set_options(model, r=30)  # each block merges at most half of its patches
    with tokenpatch.trace(model) as t:
        model(images(model, batch=1))
    assert t.tokens_per_block == [1 + 18, 1 + 9, 1 + 5, 1 + 3]
    for keep in (0.9, 0.6, 0.4):
        shares = keep_ratio_schedule(keep, 12)
        assert sum(shares) / 12 == pytest.approx(keep, abs=1e-6)
        assert list(shares) == sorted(shares, reverse=True)


def test_tome_r_zero_is_exact_and_bad_r_is_named():
    model = make_model("deit_tiny")
    x = images(model)
    reference = model(x)
    tokenpatch.patch(model, "tome", r=0)
    assert torch.equal(model(x), reference)
    for bad, why in ((-1, ">= 0, got -1"), (2.5, "an integer or None, got 2.5"), (True, "an integer or None, got True")):
        with pytest.raises(InvalidOptionError, match=f"r must be {why}"):
            tokenpatch.set_options(model, r=bad)
    assert tokenpatch.get_config(model).r == 0


def test_proportional_attention_changes_the_output_after_merging():
    model = tokenpatch.patch(make_model("deit_tiny", img_size=96), "tome", r=6)
    x = images(model)
    with_sizes = model(x)
    tokenpatch.set_options(model, proportional_attention=False)
    assert not torch.allclose(with_sizes, model(x), atol=1e-5)


def test_inverse_transform_sampling_by_hand():
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0]])
    # ascending: 0.0, 0.1 (#2), 0.1 (#3), 0.3, 0.5; CDF 0, .1, .2, .5, 1; points .125 .375 .625 .875
    hit = inverse_transform_sample(scores, torch.tensor([4]))
    assert hit.tolist() == [[True, True, False, True, False]]
    assert inverse_transform_sample(torch.full((1, 6), 1 / 6), torch.tensor([6])).all()
    one_point = inverse_transform_sample(torch.tensor([[0.7, 0.2, 0.1, 0.0]]), torch.tensor([1]))  # CDF 0 .1 .3 1 at .5
    assert one_point.tolist() == [[True, False, False, False]]


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), data=st.data())
def test_sampling_keeps_between_one_and_k_tokens_and_never_a_zero_score(m, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = torch.rand(4, m, generator=g) * (torch.rand(4, m, generator=g) > 0.3)
    scores[:, 0] += 1e-3  # at least one positive score per row
    scores = scores / scores.sum(1, keepdim=True)
    samples = torch.randint(1, m + 1, (4,), generator=g)
    hit = inverse_transform_sample(scores, samples)
    counts = hit.sum(1)
    assert (counts >= 1).all() and (counts <= samples).all()
    assert not (hit & (scores == 0)).any()


def test_significance_is_class_attention_times_value_norm():
    cls_attn = torch.tensor([[0.2, 0.6, 0.2]])
    values = torch.zeros(1, 2, 3, 2)
    values[0, 0, :, 0] = torch.tensor([1.0, 1.0, 3.0])  # head 0; head 1 adds a 4 to the last token
    values[0, 1, 2, 1] = 4.0
    expected = torch.tensor([0.2 * 1, 0.6 * 1, 0.2 * 5])
    assert torch.allclose(significance(cls_attn, values), expected / expected.sum())


def test_ats_counts_follow_the_image_and_stay_below_k():
    model = make_model("deit_tiny", img_size=96)
    for block in model.blocks:
        block.attn.qkv.weight.data *= 3  # sharper attention, as trained models have
    tokenpatch.patch(model, "ats", keep_ratio=0.6, sample_blocks=(1, 3))
    x = images(model, batch=6)
    with tokenpatch.trace(model) as t:
        model(x)
    first, second = t.records[1].counts - 1, t.records[3].counts - 1
    assert (first <= math.ceil(0.6 * 36)).all() and len(first.unique()) > 1
    assert (second <= (0.6 * first).ceil()).all()
    assert [len(s.values[0]) for s in t.scores] == [36, int(first.max())]


def test_ats_is_refused_for_average_pooling_models():
    model = make_model("avg_pool")
    with pytest.raises(InvalidOptionError, match="ats pads each batch.*global_pool='avg'"):
        tokenpatch.patch(model, "ats")
    assert not tokenpatch.is_patched(model)
