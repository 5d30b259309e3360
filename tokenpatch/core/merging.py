"""Bipartite soft matching: merge the ``r`` most redundant tokens of a set into their partners.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv:2210.09461). The tokens
are split alternately into two sets, A (even positions) and B (odd positions); each A token
points to its most similar B token (cosine similarity of a metric, e.g. head-averaged keys);
the ``r`` A tokens with the most similar partners are merged into them and the rest of A
stays. Merging averages features weighted by how many original tokens each one stands for.

Only ``gather`` and ``scatter_add`` move tokens (no ``scatter_reduce(mean)``), so the merge
traces, compiles and exports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Matching:
    """Which tokens of a set of M merge into which, for a batch.

    With ``A = ceil(M / 2)`` tokens in set A (positions 0, 2, 4, ...) and ``M - A`` in set B
    (positions 1, 3, ...), indices count within their set.

    Attributes:
        kept: (B, A - r) A tokens that stay, ascending.
        merged: (B, r) A tokens merged away.
        into: (B, r) the B token each merged A token joins.
    """

    kept: Tensor
    merged: Tensor
    into: Tensor


def bipartite_matching(metric: Tensor, r: int) -> Matching:
    """Choose ``r`` merges among (B, M) tokens by cosine similarity of ``metric``.

    Args:
        metric: (B, M, D) per-token features compared by cosine similarity.
        r: tokens to merge away, ``0 <= r <= M // 2``.

    Returns:
        The :class:`Matching`: each A token's most similar B token is its partner; the ``r`` A
        tokens with the most similar partners merge (exact ties in similarity break either way).
    """
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = metric[:, 0::2], metric[:, 1::2]
    best, partner = (a @ b.transpose(1, 2)).max(dim=-1)  # (B, A): best similarity and its B index
    order = best.argsort(dim=-1, descending=True)  # not stable=True: ONNX has no stable sort
    merged = order[:, :r]
    return Matching(kept=order[:, r:].sort(dim=-1).values, merged=merged, into=partner.gather(1, merged))


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """(B, K, ...) rows of (B, M, ...) ``t`` at (B, K) ``index``."""
    return t.gather(1, index.view(*index.shape, *([1] * (t.ndim - 2))).expand(-1, -1, *t.shape[2:]))


def merge_tokens(x: Tensor, sizes: Tensor, matching: Matching) -> tuple[Tensor, Tensor]:
    """Apply a matching: size-weighted averages of the merged groups.

    Args:
        x: (B, M, C) tokens.
        sizes: (B, M) how many original tokens each one stands for.

    Returns:
        (B, M - r, C) tokens: the kept A tokens (ascending), then every B token with its merged
        A tokens averaged in; and their (B, M - r) sizes.
    """
    a_sizes, b_sizes = sizes[:, 0::2], sizes[:, 1::2]
    weighted = x * sizes.unsqueeze(-1)
    into = matching.into.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    b_sum = weighted[:, 1::2].scatter_add(1, into, _rows(weighted[:, 0::2], matching.merged))
    b_sizes = b_sizes.scatter_add(1, matching.into, a_sizes.gather(1, matching.merged))
    kept = _rows(x[:, 0::2], matching.kept)
    return torch.cat([kept, b_sum / b_sizes.unsqueeze(-1)], dim=1), torch.cat([a_sizes.gather(1, matching.kept), b_sizes], dim=1)


def arrange(t: Tensor, matching: Matching) -> Tensor:
    """Per-token data in the merged order, each B token keeping its own: (B, M, ...) -> (B, M - r, ...)."""
    return torch.cat([_rows(t[:, 0::2], matching.kept), t[:, 1::2]], dim=1)


def destinations(matching: Matching, m: int) -> Tensor:
    """(B, M) index, among the merged tokens, of the token each of the M input tokens ends up in."""
    kept = matching.kept.shape[1]
    batch, a_size = matching.kept.shape[0], (m + 1) // 2
    b_dest = kept + torch.arange(m - a_size, device=matching.kept.device).expand(batch, -1)
    a_dest = torch.zeros(batch, a_size, dtype=torch.long, device=matching.kept.device)
    a_dest = a_dest.scatter(1, matching.kept, torch.arange(kept, device=a_dest.device).expand(batch, -1))
    a_dest = a_dest.scatter(1, matching.merged, b_dest.gather(1, matching.into))
    dest = torch.empty(batch, m, dtype=torch.long, device=a_dest.device)
    dest[:, 0::2], dest[:, 1::2] = a_dest, b_dest
    return dest
