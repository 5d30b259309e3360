"""tome (bipartite soft matching, proportional attention) and ats (inverse-transform sampling)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenpatch
from tokenpatch.errors import InvalidOptionError
from tokenpatch.core.merging import bipartite_matching, destinations, merge_tokens
from tokenpatch.methods.ats import inverse_transform_sample, significance
from tokenpatch.methods.tome import keep_ratio_schedule

from conftest import images, make_model


# -- An independent reference of ToMe, written from the official code's semantics
#    (facebookresearch/ToMe, tome/merge.py: bipartite_soft_matching with class_token/distill_token) --

def reference_bipartite_merge(x, sizes, metric, r, protected=0):
    """One sample, plain Python loops: tokens alternate into A (even) and B (odd); every A token
    draws an edge to its most cosine-similar B token; the r strongest edges merge their A token
    into the B token (size-weighted mean). The first ``protected`` tokens draw and receive no
    edge. Returns the protected tokens, the kept A tokens in order, then the B tokens."""
    a_ids, b_ids = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    targets = [b for b in b_ids if b >= protected]
    unit = [m / m.norm() for m in metric]
    edges = []
    for a in a_ids:
        if a >= protected:
            similarities = [float(unit[a] @ unit[b]) for b in targets]
            best = max(range(len(targets)), key=lambda j: similarities[j])  # first maximum on ties
            edges.append((similarities[best], a, targets[best]))
    strongest = sorted(edges, key=lambda e: -e[0])[:r]
    merged_into = {a: b for _, a, b in strongest}
    order = list(range(protected)) + [a for a in a_ids if a >= protected] + [b for b in b_ids if b >= protected]
    tokens, token_sizes = [], []
    for t in order:
        if t in merged_into:
            continue
        members = [t] + [a for a, into in merged_into.items() if into == t]
        total = sum(float(sizes[m]) for m in members)
        tokens.append(sum(x[m] * sizes[m] for m in members) / total)
        token_sizes.append(total)
    return torch.stack(tokens), torch.tensor(token_sizes)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 23), c=st.integers(1, 6), data=st.data())
def test_merge_matches_the_reference_bipartite_soft_matching(m, c, data):
    protected = data.draw(st.integers(0, min(5, m - 2)))
    r = data.draw(st.integers(0, (m - protected) // 2))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    x, metric = torch.randn(3, m, c, generator=g, dtype=torch.float64), torch.randn(3, m, 5, generator=g, dtype=torch.float64)
    sizes = torch.randint(1, 5, (3, m), generator=g).double()
    matching = bipartite_matching(metric, r, protected)
    merged, merged_sizes = merge_tokens(x, sizes, matching)
    assert merged.shape == (3, m - r, c)
    destination = destinations(matching, m)
    for b in range(3):
        expected, expected_sizes = reference_bipartite_merge(x[b], sizes[b], metric[b], r, protected)
        assert torch.allclose(merged[b], expected)
        assert torch.equal(merged_sizes[b], expected_sizes)
        assert torch.equal(destination[b, :protected], torch.arange(protected))
        for token in range(m):  # every input token is one of the members of the token it ends up in
            members = [t for t in range(m) if destination[b, t] == destination[b, token]]
            assert torch.allclose(merged[b, destination[b, token]],
                                  sum(x[b, t] * sizes[b, t] for t in members) / sum(sizes[b, t] for t in members))


def reference_tome_logits(model, x, merges):
    """The whole DeiT forward with ToMe written out: explicit softmax attention with the log-size
    bias, then the reference merge of ``merges[i]`` tokens after block i's attention, over the
    whole sequence with the prefix protected (the official split)."""
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
                t, sizes = reference_bipartite_merge(t, sizes, k.mean(0), r, p)
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


# -- An independent reference of ATS's sampler, written from the official code's arithmetic
#    (adaptivetokensampling/ATS, ats_block.py: create_ys, inverse_transform_sampling, get_unique_indices) --

def reference_ats_sample(scores, points):
    """One row of real scores: sort ascending, min-max normalise the cumulative sum, put ``points``
    values linearly from its smallest non-zero value to 1, take the first nearest entry for each."""
    order = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    cdf, total = [], 0.0
    for i in order:
        total += float(scores[i])
        cdf.append(total)
    low, high = min(cdf), max(cdf)
    curve = [(c - low) / (high - low) for c in cdf]
    start = min(c for c in curve if c != 0)
    ys = [start + i * (1 - start) / (points - 1) for i in range(points)]
    hits = set()
    for y in ys:
        distances = [abs(y - c) for c in curve]
        hits.add(order[distances.index(min(distances))])
    return [i in hits for i in range(len(scores))]


def test_inverse_transform_sampling_by_hand():
    scores = torch.tensor([[0.45, 0.3, 0.15, 0.1, 0.0]])
    # ascending #4 #3 #2 #1 #0, curve 0 .1 .25 .55 1; 3 points .1 .55 1; 6 points .1 .28 .46 .64 .82 1
    assert inverse_transform_sample(scores, 3).tolist() == [[True, True, False, True, False]]
    assert inverse_transform_sample(scores, 6).tolist() == [[True, True, True, True, False]]
    uniform = inverse_transform_sample(torch.full((1, 6), 1 / 6), 6)
    assert uniform.sum() == 5  # the lowest-ranked patch sits at 0 on the curve and is never hit


@settings(max_examples=60, deadline=None)
@given(m=st.integers(2, 40), points=st.integers(2, 60), data=st.data())
def test_sampler_matches_the_official_rule(m, points, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    scores = torch.rand(3, m, generator=g, dtype=torch.float64) ** 3 + 1e-6
    scores = scores / scores.sum(1, keepdim=True)
    hit = inverse_transform_sample(scores, points)
    for b in range(3):
        assert hit[b].tolist() == reference_ats_sample(scores[b], points)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 30), points=st.integers(1, 40), data=st.data())
def test_padding_never_changes_an_images_sample(m, points, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    real = data.draw(st.integers(1, m))
    scores = torch.zeros(1, m, dtype=torch.float64)
    scores[0, :real] = torch.rand(real, generator=g, dtype=torch.float64) + 1e-3
    scores = scores / scores.sum()
    mask = torch.arange(m) < real
    padded = inverse_transform_sample(scores, points, mask.unsqueeze(0))
    alone = inverse_transform_sample(scores[:, :real], points)
    assert not padded[0, real:].any()
    assert torch.equal(padded[0, :real], alone[0])
    assert 1 <= int(padded.sum()) <= max(1, min(points, real - 1))


def test_significance_is_class_attention_times_value_norm():
    cls_attn = torch.tensor([[0.2, 0.6, 0.2]])
    values = torch.zeros(1, 2, 3, 2)
    values[0, 0, :, 0] = torch.tensor([1.0, 1.0, 3.0])  # head 0; head 1 adds a 4 to the last token
    values[0, 1, 2, 1] = 4.0
    expected = torch.tensor([0.2 * 1, 0.6 * 1, 0.2 * 5])
    assert torch.allclose(significance(cls_attn, values), expected / expected.sum())


def reference_ats_logits(model, x, blocks, points):
    """The DeiT forward with ATS written out as the official code runs it, one image at a time:
    full softmax attention of every token, significance from the class token's row (summed over
    heads) times value norms, the reference sampler, and the kept tokens' rows of the attention."""
    out = []
    for sample in model._pos_embed(model.patch_embed(x)):
        t = sample
        for i, block in enumerate(model.blocks):
            attn = block.attn
            n = t.shape[0]
            q, k, v = attn.qkv(block.norm1(t)).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
            weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(-1)
            t = t + block.ls1(attn.proj((weights @ v).transpose(0, 1).reshape(n, -1)))
            if i in blocks:
                significance = weights[:, 0, 1:].sum(0) * v.transpose(0, 1).reshape(n, -1)[1:].norm(dim=-1)
                keep = reference_ats_sample((significance / significance.sum()).double(), points)
                t = torch.cat([t[:1], t[1:][torch.tensor(keep)]])
            t = t + block.ls2(block.mlp(block.norm2(t)))
        out.append(model.forward_head(model.norm(t[None])))
    return torch.cat(out)


def sharpened_model(**overrides):
    model = make_model("deit_tiny", img_size=96, **overrides)
    for block in model.blocks:
        block.attn.qkv.weight.data *= 3  # sharper attention, as trained models have
    return model


@pytest.mark.parametrize("options", [{"points": 36}, {"keep_ratio": 0.5}])
def test_ats_model_equals_the_official_forward_for_each_image_of_a_padded_batch(options):
    model = sharpened_model()
    x = images(model, batch=4)
    tokenpatch.patch(model, "ats", **options)
    with tokenpatch.trace(model) as t:
        logits = model(x)
    assert any(len(r.counts.unique()) > 1 for r in t.records if r.counts is not None)  # the batch was padded
    with torch.no_grad():
        expected = reference_ats_logits(model, x, blocks=range(1, 4), points=options.get("points", 18))
    assert torch.allclose(logits, expected, atol=1e-4)


def test_ats_counts_follow_the_image_and_stay_below_k():
    model = sharpened_model()
    tokenpatch.patch(model, "ats", keep_ratio=0.6, sample_blocks=(1, 3))
    x = images(model, batch=6)
    with tokenpatch.trace(model) as t:
        model(x)
    first, second = t.records[1].counts - 1, t.records[3].counts - 1
    assert (first <= math.ceil(0.6 * 36)).all() and len(first.unique()) > 1
    assert (second < first).all()  # the lowest-ranked patch always goes
    assert [len(s.values[0]) for s in t.scores] == [36, int(first.max())]


def test_ats_is_refused_for_average_pooling_models():
    model = make_model("avg_pool")
    with pytest.raises(InvalidOptionError, match="ats pads each batch.*global_pool='avg'"):
        tokenpatch.patch(model, "ats")
    assert not tokenpatch.is_patched(model)
