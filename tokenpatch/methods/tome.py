"""ToMe: merge similar tokens in every block instead of dropping any.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv:2210.09461); official
code ``facebookresearch/ToMe``. In every block, between the attention and the MLP, ``r`` tokens
are merged into their most similar partners by bipartite soft matching
(:mod:`tokenpatch.core.merging`) on the block's head-averaged keys; merged features are
size-weighted averages, and later attention adds ``log(size)`` to the logits of a token that
stands for several (proportional attention), passed to SDPA as an additive mask. Prefix tokens
(class, distillation, registers) never merge and stay in front.

This is the official rule: the alternating A/B split runs over the whole sequence, so the class
token is the first (protected) token of set A and the patches at odd positions of the sequence
form A. (tokenpatch's earlier split over the patches alone measured 1.0 point of top-1 lower at
65 % of the MACs on the shared DeiT-Tiny, docs/methods/index.md, and was removed.)

``r=`` merges a constant ``r`` per block (ToMe's own setting; each block merges at most half
of its patches). ``keep_ratio=`` instead asks for the mean share of patches the blocks' MLPs
compute on, like the other methods' keep ratios; it becomes a schedule of merge counts that
rounds a linear decline of the remaining patches, so it moves in single-token steps.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any, Optional

from torch import Tensor

from ..core.blocks import BlockView
from ..core.merging import MergeState, bipartite_merge, follow_groups, restore_merged_grid, sized_attention
from ..core.method import Method, MethodConfig, check_positive
from ..core.pieces import mlp_residual
from ..core.registry import register_method
from ..core.state import PassState
from ..errors import InvalidOptionError

#: schedule value marking a merging block under ``r=`` (a bipartite step keeps at least half)
R_MODE_RATIO = 0.5


@dataclasses.dataclass
class ToMeConfig(MethodConfig):
    """Options of ``tome``.

    Attributes:
        keep_ratio: mean share of the patches the blocks' MLPs compute on (with ``r`` set, only
            1.0 matters: it merges nothing, with or without ``r``, and is the dense model, exactly).
        r: tokens merged in every block (ToMe's ``r``), or None to derive the merges from
            ``keep_ratio``.
        proportional_attention: add ``log(size)`` to the attention logits of merged tokens.
        remaining: per block, the share of the pass's patches left after it (a schedule, e.g.
            from :func:`tokenpatch.calibrate`); overrides ``keep_ratio`` and ``r``.
    """

    keep_ratio: float = 0.6
    r: Optional[int] = None
    proportional_attention: bool = True
    remaining: Optional[tuple[float, ...]] = None

    def validate(self, depth: int) -> None:
        super().validate(depth)
        check_positive("r", self.r, allow_zero=True)
        if self.remaining is not None:
            if len(self.remaining) != depth or not all(0 < share <= 1 for share in self.remaining):
                raise InvalidOptionError(f"remaining must give a share in (0, 1] for each of the {depth} blocks, "
                                         f"got {list(self.remaining)}")
            self.remaining = tuple(float(share) for share in self.remaining)


def remaining_fractions(decline: float, depth: int) -> list[float]:
    """Share of the patches left after each block when ``decline`` of them merge per block.

    A block merges at most half of its patches, so the share never falls below half the
    previous one.
    """
    shares, share = [], 1.0
    for block in range(depth):
        share = max(1.0 - decline * (block + 1), share / 2)
        shares.append(share)
    return shares


@lru_cache(maxsize=256)
def keep_ratio_schedule(keep_ratio: float, depth: int) -> tuple[float, ...]:
    """Per block, the share of the patches left after its merge, averaging ``keep_ratio``.

    Solved by bisection on the per-block decline; below the smallest reachable mean (halving
    every block), every block merges half.
    """
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if sum(remaining_fractions(middle, depth)) / depth > keep_ratio:
            low = middle
        else:
            high = middle
    return tuple(remaining_fractions(high, depth))


@register_method
class ToMe(Method[ToMeConfig, MergeState]):
    name = "tome"
    summary = "ToMe: merge similar tokens in every block (bipartite soft matching)"
    config_class = ToMeConfig
    variants = {"r": {"r": 2}, "no_proportional_attention": {"proportional_attention": False}}

    def start_pass(self, config: ToMeConfig) -> MergeState:
        return MergeState()

    def budget_options(self, config: ToMeConfig, keep_ratio: float) -> dict[str, Any]:
        if config.r is not None or config.remaining is not None:
            raise InvalidOptionError("a MAC budget chooses tome's merges through keep_ratio; patch with r=None and "
                                     "remaining=None to use it")
        return {"keep_ratio": keep_ratio}

    def schedule(self, config: ToMeConfig, depth: int) -> list[Optional[float]]:
        """Per block, the share of the pass's patches left after it (under ``r=``, a marker)."""
        if config.remaining is not None:
            return [None if share >= 1.0 else share for share in config.remaining]
        if config.keep_ratio >= 1.0:
            return [None] * depth
        if config.r is not None:
            return [R_MODE_RATIO if config.r > 0 else None] * depth
        return list(keep_ratio_schedule(config.keep_ratio, depth))

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[MergeState], block: int, ratio: float,
                     config: ToMeConfig) -> Tensor:
        p, attention_tokens = state.num_prefix, x.shape[1]
        x, _, k, _, _ = sized_attention(view, x, state, config.proportional_attention)
        patches = int(x.shape[1]) - p  # int: shapes are tensors while fvcore traces
        r = min(self._merges(config, ratio, int(state.initial_patches), patches), patches // 2)
        if r > 0:
            x = self._merge(x, k.mean(dim=1), state, r)
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)

    def restore_grid(self, x: Tensor, state: PassState[MergeState]) -> Tensor:
        """Each merged token copied back to every patch it stands for."""
        return restore_merged_grid(x, state)

    @staticmethod
    def _merges(config: ToMeConfig, ratio: float, initial: int, patches: int) -> int:
        """Tokens this block merges: ``r``, or down to its share of the pass's initial patches."""
        if config.r is not None and config.remaining is None:
            return config.r
        return max(0, patches - max(1, round(ratio * initial)))

    @staticmethod
    def _merge(x: Tensor, keys: Tensor, state: PassState[MergeState], r: int) -> Tensor:
        """Merge ``r`` of the patches of (B, N, C) ``x``, matched on (B, N, D) ``keys``; update the state."""
        sizes = state.own.sizes if state.own.sizes is not None else x.new_ones(x.shape[:2])
        merged = bipartite_merge(x, keys, sizes, state.positions, state.num_prefix, r)
        state.own.sizes, state.positions = merged.sizes, merged.positions
        follow_groups(state, merged.moved)
        return merged.tokens
