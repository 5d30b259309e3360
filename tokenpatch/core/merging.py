"""Bipartite soft matching: merge the ``r`` most redundant tokens of a set into their partners.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv:2210.09461); official code
``facebookresearch/ToMe`` (``tome/merge.py``). The tokens of a set are split alternately into two
halves, A (even positions) and B (odd positions); each A token points to its most similar B token
(cosine similarity of a metric, e.g. head-averaged keys); the ``r`` A tokens with the most
similar partners are merged into them and the rest of A stays. Merging averages features
weighted by how many original tokens each one stands for.

The first ``protected`` tokens of the set (class, distillation, register tokens) take part in
the alternation but never merge: a protected A token has no edge and a protected B token
receives none (the official code's ``class_token`` and ``distill_token`` rules, for any count).
The merged set lists the protected tokens first, in their order, then the other kept A tokens
in order, then the other B tokens: for one protected class token, exactly the official
``[unmerged A, B]`` order.

Only ``gather`` and ``scatter_add`` move tokens (no ``scatter_reduce(mean)``), so the merge
traces, compiles and exports.

The merging methods (``tome``, ``pitome``, ``ppt``, ``diffrate``, and ``idle``'s merged idle tokens) also share
matching to kept tokens and plain means (:func:`most_similar_kept`, :func:`mean_with_joined`), their per-pass sizes
(:class:`MergeState`), proportional attention (:func:`sized_attention`), the record of which token
carries each patch (:func:`follow_groups`) and the full grid behind their tokens
(:func:`restore_merged_grid`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .blocks import BlockView
from .ops import gather_tokens
from .pieces import attention_with_projections
from .state import PassState


@dataclass(frozen=True)
class Matching:
    """Which tokens of a set of M merge into which, for a batch.

    With ``A = ceil(M / 2)`` tokens in set A (positions 0, 2, 4, ...) and ``M - A`` in set B
    (positions 1, 3, ...), indices count within their half.

    Attributes:
        kept: (B, A - r) A tokens that stay, ascending (the protected ones first).
        merged: (B, r) A tokens merged away.
        into: (B, r) the B token each merged A token joins.
        protected: how many leading tokens of the set never merge.
    """

    kept: Tensor
    merged: Tensor
    into: Tensor
    protected: int = 0


def bipartite_matching(metric: Tensor, r: int, protected: int = 0) -> Matching:
    """Choose ``r`` merges among (B, M) tokens by cosine similarity of ``metric``.

    Args:
        metric: (B, M, D) per-token features compared by cosine similarity.
        r: tokens to merge away, ``0 <= r <= (M - protected) // 2``.
        protected: leading tokens that neither merge nor receive a merge.

    Returns:
        The :class:`Matching`: each A token's most similar B token is its partner; the ``r`` A
        tokens with the most similar partners merge (exact ties in similarity break either way).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, 0::2], metric[:, 1::2]
    similarity = a @ b.transpose(1, 2)  # (B, A, M - A)
    protected_a, protected_b = (protected + 1) // 2, protected // 2  # the protected tokens lead both halves
    if protected_a:
        similarity[:, :protected_a] = float("-inf")
    if protected_b:
        similarity[:, :, :protected_b] = float("-inf")
    best, partner = similarity.max(dim=-1)  # (B, A): best similarity and its B index
    order = best.argsort(dim=-1, descending=True)  # not stable=True: ONNX has no stable sort
    merged = order[:, :r]
    kept = order[:, r:].sort(dim=-1).values
    return Matching(kept=kept, merged=merged, into=partner.gather(1, merged), protected=protected)


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """(B, K) or (B, K, C) rows of (B, M) or (B, M, C) ``t`` at (B, K) ``index`` (whole token rows
    by ``index_select``, several times faster on CPU than an expanded ``gather``)."""
    return t.gather(1, index) if t.ndim == 2 else gather_tokens(t, index)


def _protected_first(kept: int, size: int, protected: int) -> tuple[int, ...]:
    """Order of ``[kept A, B]`` (``size`` tokens) that puts the protected tokens first, as they came.

    The protected tokens alternate A, B, A, ... and lead their halves.
    """
    front = [i // 2 if i % 2 == 0 else kept + i // 2 for i in range(protected)]
    taken = set(front)
    return tuple(front + [i for i in range(size) if i not in taken])


def _joined(kept_a: Tensor, b: Tensor, matching: Matching) -> Tensor:
    """The merged set: kept A then B along dim 1, protected tokens moved to the front."""
    joined = torch.cat([kept_a, b], dim=1)
    if matching.protected < 2:  # a single protected token already leads the kept A tokens
        return joined
    order = _protected_first(kept_a.shape[1], joined.shape[1], matching.protected)
    return joined[:, list(order)]


def merge_tokens(x: Tensor, sizes: Tensor, matching: Matching) -> tuple[Tensor, Tensor]:
    """Apply a matching: size-weighted averages of the merged groups.

    Args:
        x: (B, M, C) tokens.
        sizes: (B, M) how many original tokens each one stands for.

    Returns:
        (B, M - r, C) tokens in the merged order (module docstring), each B token with its
        merged A tokens averaged in; and their (B, M - r) sizes.
    """
    a_sizes, b_sizes = sizes[:, 0::2], sizes[:, 1::2]
    merged_sizes = a_sizes.gather(1, matching.merged)
    # A token i is token 2i of x: rows picked straight from x, and only the r merged ones weighted
    merged = gather_tokens(x, 2 * matching.merged) * merged_sizes.unsqueeze(-1)
    into = matching.into.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    b_sum = (x[:, 1::2] * b_sizes.unsqueeze(-1)).scatter_add(1, into, merged)
    b_sizes = b_sizes.scatter_add(1, matching.into, merged_sizes)
    kept = gather_tokens(x, 2 * matching.kept)
    return (_joined(kept, b_sum / b_sizes.unsqueeze(-1), matching),
            _joined(a_sizes.gather(1, matching.kept), b_sizes, matching))


def arrange(t: Tensor, matching: Matching) -> Tensor:
    """Per-token data in the merged order, each B token keeping its own: (B, M, ...) -> (B, M - r, ...)."""
    return _joined(_rows(t[:, 0::2], matching.kept), t[:, 1::2], matching)


def destinations(matching: Matching, m: int) -> Tensor:
    """(B, M) index, among the merged tokens, of the token each of the M input tokens ends up in."""
    batch, device = matching.kept.shape[0], matching.kept.device
    slots = arrange(torch.arange(m, device=device).expand(batch, -1), matching)  # input token in each merged slot
    # slot of every input token that has one (kept A and all B); a merged A token goes where its partner went
    dest = torch.zeros(batch, m, dtype=torch.long, device=device)
    dest.scatter_(1, slots, torch.arange(slots.shape[1], device=device).expand(batch, -1))
    dest[:, 0::2] = dest[:, 0::2].scatter(1, matching.merged, dest[:, 1::2].gather(1, matching.into))
    return dest


@dataclass(frozen=True)
class Merged:
    """The result of merging ``r`` of N tokens of a batch.

    Attributes:
        tokens: (B, N - r, C) tokens, prefix first.
        sizes: (B, N - r) original tokens each stands for.
        positions: (B, N - r) their (representative) original positions.
        matching: the merges made (its protected tokens are the prefix).
        before: tokens N before the merge.
    """

    tokens: Tensor
    sizes: Tensor
    positions: Tensor
    matching: Matching
    before: int

    def moved(self) -> Tensor:
        """(B, T) for each of the T = N - P patches before the merge, its index among the patches
        after it (computed on demand: only a trace or a dense output needs it)."""
        p = self.matching.protected
        return destinations(self.matching, self.before)[:, p:] - p


def bipartite_merge(x: Tensor, keys: Tensor, sizes: Tensor, positions: Tensor, num_prefix: int, r: int) -> Merged:
    """ToMe's merge of ``r`` patches of (B, N, C) ``x``, matched on (B, N, D) ``keys``, the bipartite
    split alternating over the whole sequence with the ``num_prefix`` prefix tokens protected (the
    official rule). ``sizes`` and ``positions`` are (B, N)."""
    matching = bipartite_matching(keys, r, protected=num_prefix)
    merged, merged_sizes = merge_tokens(x, sizes, matching)
    return Merged(tokens=merged, sizes=merged_sizes, positions=arrange(positions, matching), matching=matching,
                  before=int(x.shape[1]))


@dataclass
class MergeState:
    """Per pass of a merging method: (B, N) original tokens each current token stands for (None
    until the first merge)."""

    sizes: Optional[Tensor] = None


def most_similar_kept(metric: Tensor, joining: Tensor, kept: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    """For each token that joins another: the most similar kept token, by cosine of ``metric``.

    Args:
        metric: (B, N, D) per-token features (no gradient is taken through the matching).
        joining: (B, J) positions in N of the tokens that join.
        kept: (B, K) positions in N of the tokens that stay; the first ``protected`` of them
            (prefix tokens) take none.

    Returns:
        (B, J) index into ``kept`` of each joining token's partner, and (B, J) their similarity.
    """
    metric = metric.detach()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = gather_tokens(metric, joining) @ gather_tokens(metric, kept).transpose(1, 2)
    similarity[..., :protected] = float("-inf")
    best, into = similarity.max(dim=-1)
    return into, best


def mean_with_joined(kept: Tensor, joined: Tensor, into: Tensor) -> tuple[Tensor, Tensor]:
    """The plain mean of each (B, K, C) kept token and the (B, J, C) tokens that join it at (B, J)
    ``into``, and (B, K) how many tokens each mean is of."""
    counts = torch.ones(kept.shape[:2], dtype=kept.dtype, device=kept.device).scatter_add(
        1, into, torch.ones(into.shape, dtype=kept.dtype, device=kept.device))
    return kept.scatter_add(1, into.unsqueeze(-1).expand_as(joined), joined) / counts.unsqueeze(-1), counts


def sized_attention(view: BlockView, x: Tensor, state: PassState[MergeState],
                    proportional: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The attention residual of a merging method's block on (B, N, C) ``x``.

    With ``proportional``, a token standing for several adds ``log(size)`` to every query's logit
    for it (ToMe's proportional attention), as an SDPA additive mask.

    Returns:
        ``x + attn(norm1(x))``, the (B, H, N, D) queries, keys and values, and the (B, N) logit
        bias used (None: none).
    """
    sizes = state.own.sizes
    bias = sizes.log() if proportional and sizes is not None else None
    x, q, k, v = attention_with_projections(view, x, state.positions, key_bias=bias)
    return x, q, k, v, bias


def follow_groups(state: PassState, moved: Callable[[], Tensor]) -> None:
    """Record, when a trace or a dense output needs it, which token carries each original patch.

    Args:
        moved: returns (B, T) for each current patch its index among the patches after the
            merge, or -1 for a patch dropped here (its grid row is then the state it left with);
            called only when needed, so a plain forward does no bookkeeping for it.
    """
    if state.trace is None and not state.keeps_grid:
        return
    index = moved()
    groups = state.groups
    if groups is None:
        groups = torch.arange(index.shape[1], device=index.device).expand(index.shape[0], -1)
    state.groups = torch.where(groups >= 0, index.gather(1, groups.clamp_min(0)), -1)


def restore_merged_grid(x: Tensor, state: PassState) -> Tensor:
    """The (B, N, C) grid of a merging method's (B, M, C) tokens: each merged token copied back to
    every patch it stands for, and each dropped patch as it left (:meth:`PassState.to_grid`)."""
    grid = state.to_grid(x)
    if state.groups is None:
        return grid
    p = state.num_prefix
    carried = gather_tokens(x[:, p:], state.groups.clamp_min(0))
    return torch.cat([grid[:, :p], torch.where(state.groups.unsqueeze(-1) >= 0, carried, grid[:, p:])], dim=1)
