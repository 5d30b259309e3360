"""SaiT: one set of weights for many token densities, with per-image (adaptive) token counts.

Li, Thorsley and Hassoun, "SaiT: Sparse Vision Transformers through Adaptive Token Pruning",
arXiv:2210.05832 (2022). Two ideas, both here:

- Dense/sparse training: fine-tuning alternates full-token steps and pruned steps
  (``dense_every``), so the same weights serve every ``keep_ratio`` chosen at run time with
  :func:`tokenpatch.set_keep_ratio`, and ``keep_ratio=1.0`` is the dense model, exactly.
- Adaptive token pruning: with ``mass`` set, each image keeps its most important patches until
  their share of the total importance reaches ``mass`` (a confident, object-centred image keeps
  few; a cluttered one keeps many), at most ``keep_ratio`` of them.

This implementation prunes once, at ``prune_block`` (a quarter of the depth), after that
block's attention and before its MLP, and ranks patches by the block's head-averaged
class-token attention (the score ``evit`` uses); only the kept patches' attention rows are
computed. The paper's full text was not available to us
offline, so its exact score and location may differ; both are options here.

Batching with per-image counts: the batch keeps as many tokens as its largest count; each
image's extra tokens are padding that no query attends to (a key mask on SDPA in every later
block), so an image's output equals its output in a batch of one. The padded tokens still cost
compute, which the MAC counter reports; ``tokenpatch.trace`` gives the real per-image counts.
Padding requires a model whose output reads only the class token (``global_pool="token"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from torch import Tensor

from ..core.blocks import BlockView, ModelFacts
from ..core.method import Method, ScoringConfig, check_block, check_positive, require_class_token_pooling
from ..core.ops import padded_top_positions, top_k_positions
from ..core.pieces import (SCORE_NAMES, drop_after_attention, kept_index, mlp_residual, padded_block, patch_scores,
                           refuse_export, scorer_rule, scoring_projections)
from ..core.registry import register_method
from ..core.state import PassState
from ..errors import InvalidOptionError


@dataclasses.dataclass
class SaiTConfig(ScoringConfig):
    """Options of ``sait``.

    Attributes:
        keep_ratio: fraction of the patches kept at ``prune_block`` (with ``mass``: at most this
            fraction); 1.0 skips pruning and is the dense model, whatever ``mass`` says.
        prune_block: the block whose attention ranks the patches; None means a quarter of the
            depth (3 of 12).
        mass: None keeps ``ceil(keep_ratio * patches)`` per image; a number in (0, 1] keeps, per
            image, the fewest top patches whose scores sum to that share of the total.
        dense_every: during fine-tuning, every ``dense_every``-th step runs dense (2: alternate
            dense and sparse steps; 0: sparse steps only).
        scorer: whose attention ranks the patches, see :class:`~tokenpatch.core.method.ScoringConfig`.
    """

    keep_ratio: float = 0.6
    prune_block: Optional[int] = None
    mass: Optional[float] = None
    dense_every: int = 2

    def validate(self, depth: int) -> None:
        super().validate(depth)
        check_block("prune_block", self.prune_block, depth)
        if self.mass is not None and not 0 < self.mass <= 1:
            raise InvalidOptionError(f"mass must be None (fixed counts) or a number in (0, 1], got {self.mass!r}")
        check_positive("dense_every", self.dense_every, allow_zero=True)

    def block(self, depth: int) -> int:
        """The prune block, default resolved."""
        return self.prune_block if self.prune_block is not None else max(1, depth // 4)


def mass_counts(scores: Tensor, mass: float) -> Tensor:
    """Per row, how many of the highest scores it takes to reach ``mass`` of the row's total.

    Args:
        scores: (B, M) non-negative scores.

    Returns:
        (B,) int64 counts in [1, M].
    """
    ranked = scores.sort(dim=1, descending=True).values
    shares = ranked.cumsum(dim=1) / ranked.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return ((shares < mass).sum(dim=1) + 1).clamp(max=scores.shape[1])


@dataclasses.dataclass
class SaiTState:
    """Per pass: whether the prune block has pruned yet."""

    pruned: bool = False


@register_method
class SaiT(Method[SaiTConfig, SaiTState]):
    name = "sait"
    summary = "SaiT: prune once by importance, fixed or per-image counts; dense/sparse fine-tuning"
    config_class = SaiTConfig
    variants = {"mass": {"mass": 0.8}}

    def start_pass(self, config: SaiTConfig) -> SaiTState:
        return SaiTState()

    def fixed_token_counts(self, config: SaiTConfig) -> bool:
        return config.mass is None

    def schedule(self, config: SaiTConfig, depth: int) -> list[Optional[float]]:
        start = config.block(depth)
        return [config.keep_ratio if i >= start else None for i in range(depth)]

    def check_compatible(self, config: SaiTConfig, facts: ModelFacts) -> None:
        if config.mass is not None:
            require_class_token_pooling("sait with mass= pads each batch to its largest token count", facts.pools_class_token,
                                        "; use fixed counts (mass=None)")

    def training_overrides(self, config: SaiTConfig, step: int) -> dict[str, Any]:
        return {"keep_ratio": 1.0} if config.dense_every and step % config.dense_every == 0 else {}

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[SaiTState], block: int, ratio: float,
                     config: SaiTConfig) -> Tensor:
        if state.own.pruned:
            return self._after_prune(view, x, state, block)
        attention_tokens = x.shape[1]
        xn, queries, k, v = scoring_projections(view, x, state, config.scorer)
        scores = patch_scores(view, queries, k, state, config.scorer).detach()
        state.record_scores(block, SCORE_NAMES[scorer_rule(config.scorer, state)], scores)
        index, counts = self._kept(state, scores, ratio, config.mass)
        x = drop_after_attention(view, x, xn, queries, k, v, index, state, counts=counts)
        state.own.pruned = True
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)

    @staticmethod
    def _kept(state: PassState, scores: Tensor, ratio: float, mass: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
        """(B, K) indices of the tokens the prune keeps, and the (B,) real tokens per image of a
        padded batch (None for a fixed count)."""
        cap = math.ceil(ratio * scores.shape[1])
        if mass is None:  # a fixed count: no data-dependent width, so the pass stays exportable
            return kept_index(state, top_k_positions(scores, cap)), None
        refuse_export("sait with mass")
        counts = mass_counts(scores, mass).clamp(max=cap)
        return kept_index(state, padded_top_positions(scores, counts)), counts + state.num_prefix

    @staticmethod
    def _after_prune(view: BlockView, x: Tensor, state: PassState, block: int) -> Tensor:
        """A block after the prune: all tokens, padding masked out of the attention."""
        state.record(block, x.shape[1], x.shape[1])
        return padded_block(view, x, state)
