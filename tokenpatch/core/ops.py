"""Token-axis kernels shared by every method.

All functions are batched over the leading dimension and use only ``gather``/``scatter``/
``topk``/``sort`` so that a patched model stays traceable and exportable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _flat_rows(index: Tensor, n: int) -> Tensor:
    """(B, K) per-sample positions -> (B*K,) row numbers in the (B*N, C) flattened tokens."""
    if index.shape[0] == 1:  # one sample: its positions are the rows (three small ops fewer at batch 1)
        return index.reshape(-1)
    offsets = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * n
    return (index + offsets).reshape(-1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Pick tokens per sample.

    Copies whole rows of C values (``index_select`` on the flattened batch), which is several
    times faster on CPU than an element-wise ``gather`` with an expanded index.

    Args:
        x: (B, N, C) tokens.
        index: (B, K) positions into the N axis.

    Returns:
        (B, K, C) with ``out[b, i] = x[b, index[b, i]]``.
    """
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, _flat_rows(index, n)).view(b, -1, c)


def gather_heads(t: Tensor, index: Tensor) -> Tensor:
    """Pick tokens of a per-head tensor.

    Args:
        t: (B, H, N, D) per-head projections.
        index: (B, K) positions into the N axis.

    Returns:
        (B, H, K, D), laid out like ``t``'s memory where that is token-major.
    """
    b, h, n, d = t.shape
    token_major = t.transpose(1, 2)
    if token_major.is_contiguous():  # heads split from a (B, N, H*D) projection: copy whole token rows
        return gather_tokens(token_major.view(b, n, h * d), index).view(b, -1, h, d).transpose(1, 2)
    return torch.gather(t, 2, index[:, None, :, None].expand(b, h, -1, d))


def scatter_tokens(x: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Write tokens back per sample, out of place (gradients reach both ``x`` and ``src``).

    Args:
        x: (B, N, C) tokens to update.
        index: (B, K) distinct positions into the N axis.
        src: (B, K, C) new values for those positions.

    Returns:
        (B, N, C): ``x`` with ``out[b, index[b, i]] = src[b, i]``.
    """
    b, n, c = x.shape
    rows = src.reshape(-1, c).to(x.dtype)
    return x.reshape(b * n, c).index_copy(0, _flat_rows(index, n), rows).view(b, n, c)


def top_k_positions(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` highest scores per sample, in ascending position order.

    Sorting the positions keeps kept tokens in their original relative order, which makes
    traces readable and results independent of how ``topk`` breaks ties internally.

    Args:
        scores: (B, M) scores.
        k: number to keep, ``1 <= k <= M``.

    Returns:
        (B, k) int64 positions into the M axis, ascending.
    """
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


def complement_positions(index: Tensor, n: int) -> Tensor:
    """Positions in ``range(n)`` that are not in ``index``, per sample, ascending.

    Args:
        index: (B, K) distinct positions into ``range(n)``.
        n: length of the axis.

    Returns:
        (B, n - K) int64 positions.
    """
    b, k = index.shape
    taken = torch.zeros(b, n, dtype=index.dtype, device=index.device).scatter(1, index, torch.full_like(index, n))
    # Keys position + n * taken are distinct and put the free positions first, in order; a plain
    # sort suffices (ONNX has no stable sort).
    return (taken + torch.arange(n, device=index.device)).sort(dim=1).indices[:, : n - k]


def prefix_positions(batch: int, num_prefix: int, device: torch.device) -> Tensor:
    """(B, P) positions ``0..P-1`` of the prefix (class, distillation, register) tokens."""
    return torch.arange(num_prefix, device=device).expand(batch, num_prefix)


def cls_attention(q_cls: Tensor, k: Tensor, scale: float, key_mask: Optional[Tensor] = None,
                  probabilities: bool = True, key_bias: Optional[Tensor] = None) -> Tensor:
    """Head-averaged attention of the class token over all keys, without the N x N matrix.

    Costs ``H * N * D`` multiply-adds, against ``H * N * N * D`` for the full attention map.

    Args:
        q_cls: (B, H, 1, D) query of the class token.
        k: (B, H, N, D) keys of every token.
        scale: the attention's logit scale (``D ** -0.5`` for standard ViTs).
        key_mask: (B, N) bool, False for padding keys (they get probability 0); None: all keys.
        probabilities: softmax over the keys before the head mean (EViT, ATS); False averages
            the scaled logits themselves (IdleViT's official inference ranking).
        key_bias: (B, N) added to the logits (ToMe's ``log(size)``), as the block's attention does.

    Returns:
        (B, N) attention probabilities (or logits) of the class token, averaged over heads.
    """
    logits = (q_cls * scale) @ k.transpose(-2, -1)
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].to(logits.dtype)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (logits.softmax(dim=-1) if probabilities else logits).mean(dim=1).squeeze(1)


def padded_top_positions(scores: Tensor, counts: Tensor) -> Tensor:
    """Top ``counts[b]`` positions of each row in ascending order, padded with the next-best ones.

    Args:
        scores: (B, M) scores.
        counts: (B,) tokens each row really keeps.

    Returns:
        (B, max(counts)) positions: row b's first ``counts[b]`` are its kept patches (ascending),
        the rest padding.
    """
    width = int(counts.max())
    best = scores.topk(width, dim=1).indices  # by descending score
    padding = torch.arange(width, device=scores.device) >= counts.unsqueeze(1)
    order = (best + padding * scores.shape[1]).sort(dim=1).indices  # real ones first, each part ascending
    return best.gather(1, order)


def write_grid(grid: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
    """Write tokens into the full token grid at their original positions, out of place.

    Args:
        grid: (B, N, C) one row per original token.
        tokens: (B, M, C) current tokens.
        positions: (B, M) original position of each token; -1 for tokens that are not one
            original token (a fused token, padding), which are skipped.

    Returns:
        (B, N, C): ``grid`` with ``out[b, positions[b, i]] = tokens[b, i]`` where positions >= 0.
    """
    b, n, c = grid.shape
    # skipped tokens land in one spare row past the grid, which is then cut off
    padded = torch.cat([grid, grid.new_zeros(b, 1, c)], dim=1)
    index = positions.masked_fill(positions < 0, n).unsqueeze(-1).expand(-1, -1, c)
    return padded.scatter(1, index, tokens.to(grid.dtype))[:, :n]


def read_grid(grid: Tensor, positions: Tensor, fallback: Tensor) -> Tensor:
    """The current tokens out of a full token grid (the inverse of :func:`write_grid`).

    Args:
        grid: (B, N, C) one row per original token.
        positions: (B, M) original positions; -1 where the token is not in the grid.
        fallback: (B, M, C) values for the tokens at position -1.

    Returns:
        (B, M, C).
    """
    known = positions >= 0
    read = gather_tokens(grid, positions.clamp(min=0))
    return torch.where(known.unsqueeze(-1), read, fallback.to(read.dtype))


def pair_bias(bias: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """The entries of a full-sequence attention bias for the tokens a block kept.

    Args:
        bias: (1 or B, H, N, N) bias over the original sequence (e.g. a relative position bias).
        query_positions, key_positions: (B, Nq) and (B, Nk) original positions, each in [0, N).

    Returns:
        (B, H, Nq, Nk) with ``out[b, h, i, j] = bias[b, h, query_positions[b, i], key_positions[b, j]]``.
    """
    batch, heads = query_positions.shape[0], bias.shape[1]
    rows = bias.expand(batch, -1, -1, -1).gather(
        2, query_positions[:, None, :, None].expand(-1, heads, -1, bias.shape[3]))
    return rows.gather(3, key_positions[:, None, None, :].expand(-1, heads, rows.shape[2], -1))


def rotary_rows(table: Tensor, positions: Tensor, num_prefix: int) -> Tensor:
    """The rotary rows of tokens at original ``positions``, identity for tokens without one.

    Args:
        table: (N - P, 2D) concatenated sin/cos rows of the patches, or (H, N - P, 2D) per head,
            or (B, 1, N - P, 2D) per image.
        positions: (B, M) original positions (prefix tokens first; -1 for fused tokens).

    Returns:
        (B, 1 or H, M, 2D): sin 0 and cos 1 (no rotation) for prefix and fused tokens.
    """
    rows = table.reshape((1,) * (4 - table.ndim) + tuple(table.shape))
    batch, count = positions.shape
    rows = rows.expand(batch, -1, -1, -1)
    patch = positions - num_prefix
    index = patch.clamp(min=0)[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[3])
    gathered = rows.gather(2, index)
    half = rows.shape[3] // 2
    identity = torch.cat([rows.new_zeros(half), rows.new_ones(half)])
    return torch.where((patch >= 0)[:, None, :, None], gathered, identity)
