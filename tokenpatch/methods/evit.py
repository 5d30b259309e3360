"""EViT: keep the attentive tokens, drop (or fuse) the rest.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022 (arXiv:2202.07800); official code ``youweiliang/evit``, whose
inference this follows exactly (same kept tokens, measured beside it). At a few blocks, after
the attention residual and before the MLP, keep the ``ceil(r * (N - P))`` non-prefix tokens with the highest
head-averaged class-token attention of that block; the rest are dropped, or with ``fuse=True``
summed into one extra token weighted by their class-token attention. A fused token is an
ordinary candidate at later reductions.

Without fusion, the attention rows of the tokens about to be dropped are never computed: the
scores need only the class token's query against every key, and the kept tokens' attention
output does not depend on the dropped ones' (the official code computes and discards them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from ..core.blocks import BlockView
from ..core.method import Method, ScoringConfig, check_blocks, quarter_blocks
from ..core.ops import complement_positions, gather_tokens, top_k_positions
from ..core.pieces import (SCORE_NAMES, attention_with_projections, drop_after_attention, keep_tokens, kept_index,
                           mlp_residual, patch_scores, scorer_rule, scoring_projections)
from ..core.registry import register_method
from ..core.state import PassState


@dataclasses.dataclass
class EViTConfig(ScoringConfig):
    """Options of ``evit``.

    Attributes:
        keep_ratio: fraction of the current non-prefix tokens kept at each reduction block.
        drop_blocks: blocks that reduce; None means 1/4, 2/4, 3/4 of the depth ((3, 6, 9) for 12).
        fuse: fuse the dropped tokens into one extra token instead of discarding them.
        scorer: see :class:`~tokenpatch.core.method.ScoringConfig` (class-token attention, the
            paper's rule, wherever the model has a class token).
    """

    keep_ratio: float = 0.7
    drop_blocks: Optional[tuple[int, ...]] = None
    fuse: bool = False

    def validate(self, depth: int) -> None:
        super().validate(depth)
        if self.drop_blocks is not None:
            check_blocks("drop_blocks", self.drop_blocks, depth)


@register_method
class EViT(Method[EViTConfig, None]):
    name = "evit"
    summary = "EViT: drop (or fuse) inattentive tokens at a few blocks"
    config_class = EViTConfig
    variants = {"fuse": {"fuse": True}}

    def schedule(self, config: EViTConfig, depth: int) -> list[Optional[float]]:
        blocks = config.drop_blocks if config.drop_blocks is not None else quarter_blocks(depth)
        return [config.keep_ratio if i in blocks else None for i in range(depth)]

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[None], block: int, ratio: float,
                     config: EViTConfig) -> Tensor:
        attention_tokens, candidates = x.shape[1], x.shape[1] - state.num_prefix
        keep = math.ceil(ratio * candidates)
        if config.fuse or keep >= candidates:  # the fused token needs the dropped tokens' attention output
            x, q, k, _ = attention_with_projections(view, x, state.positions)
            patch_attn = self._scores(view, q, k, state, block, config)
            if keep < candidates:
                x = self._fuse(x, state, patch_attn, keep)
        else:
            xn, queries, k, v = scoring_projections(view, x, state, config.scorer)
            patch_attn = self._scores(view, queries, k, state, block, config)
            index = kept_index(state, top_k_positions(patch_attn, keep))
            x = drop_after_attention(view, x, xn, queries, k, v, index, state)
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)

    @staticmethod
    def _scores(view: BlockView, q: Tensor, k: Tensor, state: PassState, block: int, config: EViTConfig) -> Tensor:
        """(B, N - P) class-token attention of the patches (or the mean query's), traced."""
        patch_attn = patch_scores(view, q, k, state, config.scorer)
        state.record_scores(block, SCORE_NAMES[scorer_rule(config.scorer, state)], patch_attn)
        return patch_attn

    def _fuse(self, x: Tensor, state: PassState, patch_attn: Tensor, keep: int) -> Tensor:
        """The kept tokens of (B, N, C) ``x`` plus one token fusing the dropped ones."""
        keep_positions = top_k_positions(patch_attn, keep)
        kept, index = keep_tokens(x, state, keep_positions)
        state.select(index, x)
        fused = self._fused_token(x[:, state.num_prefix:], patch_attn, keep_positions)
        state.positions = torch.cat([state.positions, state.positions.new_full((x.shape[0], 1), -1)], dim=1)
        return torch.cat([kept, fused], dim=1)

    @staticmethod
    def _fused_token(patches: Tensor, patch_attn: Tensor, keep_positions: Tensor) -> Tensor:
        """(B, 1, C): dropped patches summed with their class-token attention as weights."""
        dropped = complement_positions(keep_positions, patches.shape[1])
        weights = torch.gather(patch_attn, 1, dropped).unsqueeze(-1)
        return (gather_tokens(patches, dropped) * weights).sum(dim=1, keepdim=True)
