"""ATS: adaptive token sampling, a parameter-free, per-image number of tokens.

Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022
(arXiv:2111.15667). At a few blocks, after the attention and before the MLP, each patch gets a
significance score: the class token's attention to it times the norm of its value vector
(all heads), normalised over the patches. The scores, sorted ascending, form a CDF; ``K``
evenly spaced points ``(i + 0.5) / K`` on its vertical axis are mapped back through the
inverse CDF (the first patch whose cumulative score reaches the point). A patch hit by several
points is kept once, so an image whose attention is concentrated keeps fewer than ``K``
patches and a diffuse one keeps up to ``K``: the count follows the input.

``K = ceil(keep_ratio * patches)`` of each image's current patches. Batches are padded to
their largest count, with an SDPA key mask in every later block (as in ``sait``), so an
image's output does not depend on the rest of the batch; padding needs a model that reads only
the class token (``global_pool="token"``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..core.blocks import BlockView, ModelFacts
from ..core.method import Method, ScoringConfig, check_blocks, quarter_blocks, require_class_token_pooling
from ..core.ops import gather_tokens, padded_top_positions, prefix_positions
from ..core.pieces import attention_with_projections, mlp_residual, padded_block, patch_scores, refuse_export
from ..core.registry import register_method
from ..core.state import PassState


@dataclasses.dataclass
class ATSConfig(ScoringConfig):
    """Options of ``ats``.

    Attributes:
        keep_ratio: sampling points per sampling block, as a share of each image's current
            patches (the most it can keep; duplicates make it keep fewer). 1.0 turns sampling
            off and is the dense model, exactly.
        sample_blocks: blocks that sample; None means 1/4, 2/4, 3/4 of the depth ((3, 6, 9) for 12).
        scorer: whose attention ranks the patches, see :class:`~tokenpatch.core.method.ScoringConfig`.
    """

    keep_ratio: float = 0.7
    sample_blocks: Optional[tuple[int, ...]] = None

    def validate(self, depth: int) -> None:
        super().validate(depth)
        if self.sample_blocks is not None:
            check_blocks("sample_blocks", self.sample_blocks, depth)

    def blocks(self, depth: int) -> tuple[int, ...]:
        """The sampling blocks, default resolved."""
        return self.sample_blocks if self.sample_blocks is not None else quarter_blocks(depth)


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


def inverse_transform_sample(scores: Tensor, samples: Tensor) -> Tensor:
    """Which tokens ``samples[b]`` evenly spaced points of the score CDF hit.

    Args:
        scores: (B, M) non-negative scores summing to 1 per row.
        samples: (B,) number of points K_b per row (points at ``(i + 0.5) / K_b``).

    Returns:
        (B, M) bool, True for every token hit at least once (between 1 and K_b per row; a
        token with zero score is never hit).
    """
    ranked, order = scores.sort(dim=1, stable=True)
    cdf = ranked.cumsum(dim=1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-12)
    steps = torch.arange(int(samples.max()), device=scores.device)
    points = ((steps + 0.5) / samples.unsqueeze(1)).to(cdf.dtype)
    hits = torch.searchsorted(cdf, points).clamp(max=scores.shape[1] - 1)
    valid = (steps < samples.unsqueeze(1)).to(scores.dtype)
    hit_ranked = torch.zeros_like(scores).scatter_add(1, hits, valid) > 0
    return torch.zeros_like(hit_ranked).scatter(1, order, hit_ranked)


@register_method
class ATS(Method[ATSConfig, None]):
    name = "ats"
    summary = "ATS: sample tokens by inverse-transform sampling of significance, per-image counts"
    config_class = ATSConfig

    def fixed_token_counts(self, config: ATSConfig) -> bool:
        return False

    def schedule(self, config: ATSConfig, depth: int) -> list[Optional[float]]:
        start = min(config.blocks(depth))
        return [config.keep_ratio if i >= start else None for i in range(depth)]

    def check_compatible(self, config: ATSConfig, facts: ModelFacts) -> None:
        require_class_token_pooling("ats pads each batch to its largest token count", facts.pools_class_token)

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[None], block: int, ratio: float,
                     config: ATSConfig) -> Tensor:
        if block not in config.blocks(state.depth):
            state.record(block, x.shape[1], x.shape[1])
            return padded_block(view, x, state)
        refuse_export(self.name)
        attention_tokens = x.shape[1]
        x, scores = self._attend_and_score(view, x, state, block, config.scorer)
        hit = inverse_transform_sample(scores, (ratio * state.patch_counts(x)).ceil().long().clamp(min=1))
        x = self._keep(x, state, hit)
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)

    @staticmethod
    def _attend_and_score(view: BlockView, x: Tensor, state: PassState, block: int,
                          scorer: str) -> tuple[Tensor, Tensor]:
        """The attention residual on (B, N, C) ``x`` (padding masked) and the (B, N - P) patch significance."""
        p = state.num_prefix
        key_mask = state.real_tokens(x.shape[1])
        x, q, k, v = attention_with_projections(view, x, state.positions, key_mask)
        scores = significance(patch_scores(view, q, k, state, scorer, key_mask), v[:, :, p:])
        state.record_scores(block, "significance", scores, None if key_mask is None else key_mask[:, p:])
        return x, scores

    @staticmethod
    def _keep(x: Tensor, state: PassState, hit: Tensor) -> Tensor:
        """Prefix plus the hit patches of (B, N, C) ``x``, padded to the batch's largest count."""
        p, counts = state.num_prefix, hit.sum(dim=1)
        keep = padded_top_positions(hit.to(x.dtype), counts)
        index = torch.cat([prefix_positions(x.shape[0], p, x.device), keep + p], dim=1)
        state.select(index, x, counts + p)
        return gather_tokens(x, index)
