"""The reduced-token block pieces every method composes, and the state a forward pass carries.

A method's block forward is a short composition of these functions: score, select
(``ops.top_k_positions``), compute on the selected tokens (:func:`attention_residual`,
:func:`mlp_residual`), then write back, drop, fuse or merge. The attention itself always runs
on ``F.scaled_dot_product_attention``; class-token scores come from
:func:`~tokenpatch.ops.cls_attention`, never from a materialised N x N map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends.base import BlockView
from .ops import cls_attention, gather_tokens, prefix_positions
from .trace import BlockRecord, Trace


@dataclass
class PassState:
    """What one forward pass carries from block to block.

    Attributes:
        num_prefix: number of prefix tokens P (class token first).
        positions: (B, N) original position of each current token; -1 for fused tokens.
        scores: (B, N - P) per-patch importance a method carries across blocks, or None.
        trace: where to record per-block token counts, or None.
    """

    num_prefix: int
    positions: Tensor
    scores: Optional[Tensor] = None
    trace: Optional[Trace] = None

    @classmethod
    def start(cls, x: Tensor, num_prefix: int, trace: Optional[Trace]) -> "PassState":
        """State for a pass whose first block receives ``x`` of shape (B, N, C)."""
        b, n, _ = x.shape
        positions = torch.arange(n, device=x.device).expand(b, n)
        if trace is not None:
            trace.records.clear()
        return cls(num_prefix=num_prefix, positions=positions, trace=trace)

    def record(self, block: int, attention_tokens: int, output_tokens: int, computed: Optional[Tensor] = None) -> None:
        """Log one block's work if a trace is open.

        Args:
            computed: (B, M) indices into the current tokens whose MLP ran; None means all.
        """
        if self.trace is not None:
            positions = self.positions if computed is None else self.positions.gather(1, computed)
            self.trace.records.append(
                BlockRecord(block, int(attention_tokens), int(positions.shape[1]), int(output_tokens), positions.detach())
            )

    def select(self, index: Tensor) -> None:
        """Keep only the tokens at ``index`` (B, K) in the tracked positions (tokens were dropped)."""
        self.positions = torch.gather(self.positions, 1, index)


def attend(view: BlockView, q: Tensor, k: Tensor, v: Tensor, xn: Tensor) -> Tensor:
    """Multi-head attention on SDPA plus the output projection.

    Args:
        q: (B, H, Nq, D) queries; k, v: (B, H, Nk, D).
        xn: (B, Nq, C) normed query tokens (some blocks gate the output on them).

    Returns:
        (B, Nq, C) attention-branch output, before the residual.
    """
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=view.attn_dropout, scale=view.scale)
    return view.attention_output(o, xn)


def attention_residual(view: BlockView, x: Tensor, with_cls_attention: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """First half of a block on all tokens of ``x``: ``x + attn(norm1(x))``.

    Args:
        x: (B, N, C) tokens; the class token is at position 0.
        with_cls_attention: also return the class token's head-averaged attention.

    Returns:
        (B, N, C) tokens after the attention residual, and (B, N) class-token attention over
        all N tokens (or None).
    """
    xn = view.norm1(x)
    q, k, v = view.qkv(xn)
    scores = cls_attention(q[:, :, :1], k, view.scale) if with_cls_attention else None
    return view.add_attention(x, attend(view, q, k, v, xn)), scores


def mlp_residual(view: BlockView, x: Tensor) -> Tensor:
    """Second half of a block: ``x + mlp(norm2(x))``, (B, N, C) -> (B, N, C)."""
    return view.mlp_residual(x)


def full_block(view: BlockView, x: Tensor) -> Tensor:
    """A whole block on all tokens, composed from the pieces; equals the block's own forward."""
    return mlp_residual(view, attention_residual(view, x)[0])


def keep_tokens(x: Tensor, state: PassState, keep_positions: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix tokens plus the patches at ``keep_positions``.

    Args:
        x: (B, N, C) tokens.
        keep_positions: (B, K) positions of patches to keep, counted from the first patch.

    Returns:
        (B, P + K, C) kept tokens and their (B, P + K) positions in ``x``.
    """
    prefix = prefix_positions(x.shape[0], state.num_prefix, x.device)
    index = torch.cat([prefix, keep_positions + state.num_prefix], dim=1)
    return gather_tokens(x, index), index
