"""ToMe: merge similar tokens in every block instead of dropping any.

Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv:2210.09461). In every
block, between the attention and the MLP, ``r`` patch tokens are merged into their most similar
partners by bipartite soft matching (:mod:`tokenpatch.merging`) on the block's head-averaged
keys; merged features are size-weighted averages, and later attention adds ``log(size)`` to the
logits of a token that stands for several (proportional attention), passed to SDPA as an
additive mask. Prefix tokens (class, distillation, registers) never merge and stay in front.

``r=`` merges a constant ``r`` per block (ToMe's own setting; each block merges at most half
of its patches). ``keep_ratio=`` instead asks for the mean share of patches the blocks' MLPs
compute on, like the other methods' keep ratios; it becomes a schedule of merge counts that
rounds a linear decline of the remaining patches, so it moves in single-token steps.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from ..backends.base import BlockView
from ..engine import PassState, attention_with_projections, mlp_residual
from ..errors import InvalidOptionError
from ..merging import arrange, bipartite_matching, destinations, merge_tokens
from .base import Method, MethodConfig

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
    """

    keep_ratio: float = 0.6
    r: Optional[int] = None
    proportional_attention: bool = True

    def validate(self, depth: int) -> None:
        super().validate(depth)
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0):
            raise InvalidOptionError(f"r must be None or an integer >= 0 (tokens merged per block), got {self.r!r}")
        self.proportional_attention = bool(self.proportional_attention)


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


class ToMe(Method):
    name = "tome"
    summary = "ToMe: merge similar tokens in every block (bipartite soft matching)"
    config_class = ToMeConfig

    def schedule(self, config: MethodConfig, depth: int) -> list[Optional[float]]:
        """Per block, the share of the pass's patches left after it (under ``r=``, a marker)."""
        assert isinstance(config, ToMeConfig)
        if config.keep_ratio >= 1.0:
            return [None] * depth
        if config.r is not None:
            return [R_MODE_RATIO if config.r > 0 else None] * depth
        return list(keep_ratio_schedule(config.keep_ratio, depth))

    def reduce_block(
        self, view: BlockView, x: Tensor, state: PassState, block: int, ratio: float, config: MethodConfig
    ) -> Tensor:
        assert isinstance(config, ToMeConfig)
        p, attention_tokens = state.num_prefix, x.shape[1]
        bias = state.sizes.log() if config.proportional_attention and state.sizes is not None else None
        x, _, k, _ = attention_with_projections(view, x, key_bias=bias)
        patches = int(x.shape[1]) - p  # int: shapes are tensors while fvcore traces
        r = min(self._merges(config, ratio, int(state.initial_patches), patches), patches // 2)
        if r > 0:
            x = self._merge(x, k.mean(dim=1), state, r)
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)

    @staticmethod
    def _merges(config: ToMeConfig, ratio: float, initial: int, patches: int) -> int:
        """Tokens this block merges: ``r``, or down to its share of the pass's initial patches."""
        if config.r is not None:
            return config.r
        return max(0, patches - max(1, round(ratio * initial)))

    @staticmethod
    def _merge(x: Tensor, keys: Tensor, state: PassState, r: int) -> Tensor:
        """Merge ``r`` of the patches of (B, N, C) ``x``, matched on (B, N, D) ``keys``; update the state."""
        p, patches = state.num_prefix, int(x.shape[1]) - state.num_prefix
        sizes = state.sizes if state.sizes is not None else x.new_ones(x.shape[:2])
        matching = bipartite_matching(keys[:, p:], r)
        merged, merged_sizes = merge_tokens(x[:, p:], sizes[:, p:], matching)
        state.sizes = torch.cat([sizes[:, :p], merged_sizes], dim=1)
        state.positions = torch.cat([state.positions[:, :p], arrange(state.positions[:, p:], matching)], dim=1)
        if state.trace is not None:  # which token carries each original patch, for explain
            groups = state.groups if state.groups is not None else torch.arange(patches, device=x.device).expand(x.shape[0], -1)
            state.groups = destinations(matching, patches).gather(1, groups)
        return torch.cat([x[:, :p], merged], dim=1)

