"""Properties of the token-axis kernels."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenpatch.core.ops import (
    cls_attention,
    complement_positions,
    gather_heads,
    gather_tokens,
    scatter_tokens,
    top_k_positions,
)


@st.composite
def tokens_and_index(draw):
    b, n, c = draw(st.integers(1, 4)), draw(st.integers(1, 24)), draw(st.integers(1, 8))
    k = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=g)
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b)])
    return x, index


@settings(max_examples=60, deadline=None)
@given(tokens_and_index())
def test_gather_then_scatter_round_trips(case):
    x, index = case
    picked = gather_tokens(x, index)
    assert torch.equal(scatter_tokens(x, index, picked), x)
    changed = scatter_tokens(x, index, picked + 1.0)
    assert torch.equal(gather_tokens(changed, index), picked + 1.0)
    untouched = complement_positions(index, x.shape[1])
    assert torch.equal(gather_tokens(changed, untouched), gather_tokens(x, untouched))


@settings(max_examples=60, deadline=None)
@given(tokens_and_index())
def test_complement_is_the_sorted_rest(case):
    x, index = case
    n = x.shape[1]
    rest = complement_positions(index, n)
    for row, comp in zip(index.tolist(), rest.tolist()):
        assert comp == sorted(set(range(n)) - set(row))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.data())
def test_top_k_positions_are_the_k_best_in_order(b, m, data):
    k = data.draw(st.integers(1, m))
    scores = torch.randn(b, m, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    positions = top_k_positions(scores, k)
    assert positions.shape == (b, k)
    assert torch.all(positions[:, 1:] > positions[:, :-1])
    expected = scores.topk(k, dim=1).values.sort(dim=1).values
    assert torch.equal(scores.gather(1, positions).sort(dim=1).values, expected)


@settings(max_examples=60, deadline=None)
@given(tokens_and_index())
def test_gather_tokens_matches_indexing(case):
    x, index = case  # batch 1 takes the positions as rows directly, larger batches offset them
    assert torch.equal(gather_tokens(x, index), torch.stack([x[b, index[b]] for b in range(x.shape[0])]))


def test_gather_heads_matches_indexing_in_either_memory_layout():
    index = torch.tensor([[0, 6, 2], [5, 1, 3]])
    head_major = torch.randn(2, 3, 7, 4)
    token_major = torch.randn(2, 7, 3, 4).transpose(1, 2)  # heads split from one (B, N, H*D) projection
    for t in (head_major, token_major):
        out = gather_heads(t, index)
        assert out.shape == (2, 3, 3, 4)
        assert all(torch.equal(out[b, h], t[b, h, index[b]]) for b in range(2) for h in range(3))


def test_cls_attention_is_the_class_row_of_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    scale = 8**-0.5
    full = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
    expected = full[:, :, 0].mean(1)
    assert torch.allclose(cls_attention(q[:, :, :1], k, scale), expected, atol=1e-6)
    assert torch.allclose(cls_attention(q[:, :, :1], k, scale).sum(1), torch.ones(2))
