"""ATS: adaptive token sampling, a parameter-free, per-image number of tokens.

Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022
(arXiv:2111.15667); official code ``adaptivetokensampling/ATS``
(``libs/models/transformers/ats_block.py``), whose inference rule this follows. In every
sampling block (by default every block from a quarter of the depth on: 3..11 of 12, the
official ``ATS_BLOCKS``), after the attention and before the MLP, each patch gets a significance
score: the class token's attention to it times the norm of its value vector (all heads),
normalised over the patches. The scores, sorted ascending, form a cumulative curve, min-max
normalised to [0, 1]; ``K`` points are placed linearly from the curve's smallest non-zero value
up to 1, and each point takes the patch whose curve value is nearest (the first one on ties). A
patch hit by several points is kept once, so an image whose attention is concentrated keeps
few patches and a diffuse one keeps many: the count follows the input. The lowest-scored patch
sits at 0 on the curve and is never kept.

``K = ceil(keep_ratio * patches)`` of the pass's initial patches, the same in every sampling
block (the official code has one operating point, ``K`` = all initial patches; ``points=``
sets ``K`` directly, so ``points=196`` on a 224-pixel DeiT is the official configuration).
Only the kept tokens' attention rows are computed. Batches are padded to their largest count,
with an SDPA key mask in every later block, so an image's output does not depend on the rest of
the batch (the official code lets the padding shift the curve's minimum); padding needs a model
that reads only the class token (``global_pool="token"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from ..core.blocks import BlockView, ModelFacts
from ..core.method import Method, ScoringConfig, check_blocks, check_positive, require_class_token_pooling
from ..core.ops import padded_top_positions
from ..core.pieces import (drop_after_attention, kept_index, mlp_residual, padded_block, patch_scores, refuse_export,
                           scoring_projections)
from ..core.registry import register_method
from ..core.state import PassState


#: schedule value of the sampling blocks when ``points`` sets their count (any ratio below 1)
POINTS_MARKER = 0.5


@dataclasses.dataclass
class ATSConfig(ScoringConfig):
    """Options of ``ats``.

    Attributes:
        keep_ratio: sampling points per sampling block, as a share of the pass's initial patches
            (duplicates make a block keep fewer). 1.0 turns sampling off and is the dense
            model, exactly.
        points: sampling points per sampling block, overriding ``keep_ratio`` (the official
            code's is the number of initial patches).
        sample_blocks: blocks that sample; None means every block from a quarter of the depth
            on (3..11 for 12, the official ``ATS_BLOCKS``).
        scorer: whose attention ranks the patches, see :class:`~tokenpatch.core.method.ScoringConfig`.
    """

    keep_ratio: float = 0.7
    points: Optional[int] = None
    sample_blocks: Optional[tuple[int, ...]] = None

    def validate(self, depth: int) -> None:
        super().validate(depth)
        check_positive("points", self.points)
        if self.sample_blocks is not None:
            check_blocks("sample_blocks", self.sample_blocks, depth)

    def blocks(self, depth: int) -> tuple[int, ...]:
        """The sampling blocks, default resolved."""
        return self.sample_blocks if self.sample_blocks is not None else tuple(range(max(1, depth // 4), depth))

    def sampling_points(self, ratio: float, initial_patches: int) -> int:
        """``K``: ``points``, or ``ceil(ratio * initial_patches)``, at least 1."""
        return self.points if self.points is not None else max(1, math.ceil(ratio * initial_patches - 1e-9))


def significance(attention: Tensor, values: Tensor) -> Tensor:
    """ATS significance of each token: class-token attention times value norm, normalised.

    Args:
        attention: (B, M) head-averaged attention the scored tokens get from the class token
            (or the mean query, :func:`~tokenpatch.core.pieces.patch_scores`); 0 for padding.
        values: (B, H, M, D) their values.

    Returns:
        (B, M) non-negative scores summing to 1 per row.
    """
    scores = attention * values.transpose(1, 2).flatten(2).norm(dim=-1)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)


def inverse_transform_sample(scores: Tensor, points: int, real: Optional[Tensor] = None) -> Tensor:
    """Which patches ``points`` samples of the normalised score curve hit (the official rule).

    Args:
        scores: (B, M) non-negative scores summing to 1 over each row's real patches; 0 for
            padding.
        points: K, the number of points placed on the curve.
        real: (B, M) bool, False for padding; None: all real.

    Returns:
        (B, M) bool, True for every patch hit at least once (at least one per row with a real
        patch; padding and the lowest-scored patch of a row with two or more are never hit).
    """
    ranked, order = scores.masked_fill(~real, -1.0).sort(dim=1) if real is not None else scores.sort(dim=1)
    cdf = ranked.clamp_min(0).cumsum(dim=1)
    m = scores.shape[1]
    first_real = (m - real.sum(dim=1, keepdim=True)) if real is not None else cdf.new_zeros(scores.shape[0], 1).long()
    low = cdf.gather(1, first_real.clamp(max=m - 1))
    curve = (cdf - low) / (cdf[:, -1:] - low).clamp_min(torch.finfo(cdf.dtype).tiny)
    curve = curve.masked_fill(torch.arange(m, device=cdf.device) < first_real, -1.0)  # padding: never nearest
    start = curve.masked_fill(curve <= 0, 2.0).min(dim=1, keepdim=True).values.clamp(max=1.0)
    steps = torch.arange(points, device=cdf.device, dtype=cdf.dtype) / max(points - 1, 1)
    hits = _nearest(curve.contiguous(), (start + steps * (1 - start)).contiguous())
    hit_ranked = torch.zeros_like(scores).scatter(1, hits, 1.0)
    return torch.zeros_like(hit_ranked).scatter(1, order, hit_ranked) > 0


def _nearest(curve: Tensor, values: Tensor) -> Tensor:
    """(B, K) index of the first entry of the ascending (B, M) ``curve`` nearest to each of (B, K) ``values``."""
    m = curve.shape[1]
    above = torch.searchsorted(curve, values)  # first entry >= the value
    high, low = above.clamp(max=m - 1), (above - 1).clamp(min=0)
    closer_above = (curve.gather(1, high) - values).abs() < (values - curve.gather(1, low)).abs()
    chosen = torch.where(closer_above, high, low)
    # first entry of equal value; a NaN curve (an image with a NaN pixel) finds none: keep the index
    # in range, so that image alone comes out NaN, as unpatched, and not the whole batch an error
    return torch.searchsorted(curve, curve.gather(1, chosen).contiguous()).clamp(max=m - 1)


@register_method
class ATS(Method[ATSConfig, None]):
    name = "ats"
    summary = "ATS: sample tokens by inverse-transform sampling of significance, per-image counts"
    config_class = ATSConfig

    def fixed_token_counts(self, config: ATSConfig) -> bool:
        return False

    def schedule(self, config: ATSConfig, depth: int) -> list[Optional[float]]:
        """``keep_ratio`` at the sampling blocks and every block after the first (padding masks);
        with ``points`` set, the ratio is only a marker (below 1: the block runs the method)."""
        start = min(config.blocks(depth))
        ratio = POINTS_MARKER if config.points is not None else config.keep_ratio
        return [ratio if i >= start else None for i in range(depth)]

    def check_compatible(self, config: ATSConfig, facts: ModelFacts) -> None:
        require_class_token_pooling("ats pads each batch to its largest token count", facts.pools_class_token)

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[None], block: int, ratio: float,
                     config: ATSConfig) -> Tensor:
        if block not in config.blocks(state.depth):
            state.record(block, x.shape[1], x.shape[1])
            return padded_block(view, x, state)
        refuse_export(self.name)
        p, attention_tokens = state.num_prefix, x.shape[1]
        key_mask = state.real_tokens(x.shape[1])
        xn, queries, k, v = scoring_projections(view, x, state, config.scorer)
        scores = significance(patch_scores(view, queries, k, state, config.scorer, key_mask), v[:, :, p:])
        real = None if key_mask is None else key_mask[:, p:]
        state.record_scores(block, "significance", scores, real)
        hit = inverse_transform_sample(scores, config.sampling_points(ratio, state.initial_patches), real)
        counts = hit.sum(dim=1)
        index = kept_index(state, padded_top_positions(hit.to(x.dtype), counts))
        x = drop_after_attention(view, x, xn, queries, k, v, index, state, key_mask, counts + p)
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)
