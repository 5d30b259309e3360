"""DiffRate: in every block, prune the patches the class token ignores, then merge the least
attended of the rest into their most similar tokens, at searched per-block rates.

Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
ICCV 2023 (arXiv:2305.17997); official code ``OpenGVLab/DiffRate``. The inference rule follows
the official code (``DiffRate/patch/deit.py``: ``DiffRateBlock.forward`` outside training and
``DiffRateAttention.forward``; ``DiffRate/merge.py``: ``get_merge_func``):

1. attention with ToMe's proportional attention (``log(size)`` added to the logit of a token
   that stands for several);
2. after the attention residual, the patches are ranked by the class token's attention
   (softmax probabilities of that same attention, mean over heads);
3. pruning: only the ``pruned[l]`` most attended patches stay;
4. merging: of those, each one ranked below ``merged[l]`` joins the most similar of the
   ``merged[l]`` most attended patches (cosine of the tokens themselves; the class token takes
   none, and here no other prefix token either: the official models have no other), which
   becomes the plain mean of itself and the tokens it took (``scatter_reduce(mean)`` including
   itself), and its size grows by each joining token's size times their similarity (the
   official code's note: better for off-the-shelf models; a negative similarity adds nothing
   here, where the official code would shrink the size, possibly to a log of 0 or less);
5. the MLP runs on what is left.

On a model without a class token the patches are ranked by the mean patch query's attention
(``scorer``, as the other class-attention methods; the paper's rule needs a class token).

The per-block counts are what DiffRate searches, by gradient descent on ImageNet with the
weights frozen; its searched counts for DeiT-T and DeiT-S (``compression_rate.json``) are in
:data:`PUBLISHED` and :func:`published_schedule` gives them as options. tokenpatch keeps tokens in
position order (the official code sorts them by attention; attention and the MLP do not depend
on the order).

Options: ``pruned`` and ``merged`` give the per-block shares of the pass's initial patches left
after pruning and after merging (a searched schedule); without them, ``keep_ratio`` scales the
reductions of DiffRate's DeiT-S schedule at 2.9 GFLOPs (its 79.54 top-1 against 79.8 unpatched,
the paper's headline), stretched over the model's depth, so that the share left after merging
averages ``keep_ratio`` over the blocks: a budget is then met through ``keep_ratio``.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any, Optional

import torch
from torch import Tensor

from ..core.blocks import BlockView
from ..core.merging import (MergeState, follow_groups, mean_with_joined, most_similar_kept, restore_merged_grid,
                             sized_attention)
from ..core.method import Method, ScoringConfig
from ..core.ops import gather_tokens
from ..core.pieces import SCORE_NAMES, kept_index, mlp_residual, patch_scores, scorer_rule
from ..core.registry import register_method
from ..core.state import PassState
from ..errors import InvalidOptionError

#: DiffRate's searched token counts (class token included, 197 at 224 px) per block after
#: pruning and after merging, by model and GFLOPs (``compression_rate.json`` of the official code)
PUBLISHED: dict[tuple[str, float], tuple[tuple[int, ...], tuple[int, ...]]] = {
    ("deit_tiny", 0.6): ((197, 196, 180, 157, 130, 107, 86, 73, 63, 51, 40, 3),
                         (197, 187, 167, 139, 114, 90, 76, 66, 57, 45, 37, 3)),
    ("deit_tiny", 0.7): ((197, 196, 194, 180, 150, 123, 98, 82, 68, 60, 52, 3),
                         (197, 196, 192, 158, 133, 103, 88, 72, 64, 58, 49, 3)),
    ("deit_tiny", 0.8): ((197, 197, 196, 186, 166, 147, 117, 103, 92, 80, 74, 3),
                         (197, 196, 190, 172, 154, 125, 107, 96, 84, 78, 70, 3)),
    ("deit_tiny", 0.9): ((197, 197, 196, 190, 182, 166, 141, 125, 113, 105, 99, 3),
                         (197, 196, 194, 188, 172, 147, 129, 115, 107, 103, 96, 3)),
    ("deit_small", 2.3): ((197, 192, 168, 143, 121, 105, 92, 74, 62, 45, 33, 3),
                          (197, 180, 156, 127, 109, 98, 80, 66, 52, 37, 31, 3)),
    ("deit_small", 2.5): ((197, 192, 174, 156, 131, 115, 111, 99, 76, 50, 39, 3),
                          (197, 186, 160, 133, 119, 107, 96, 82, 66, 43, 37, 3)),
    ("deit_small", 2.7): ((197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3),
                          (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)),
    ("deit_small", 2.9): ((197, 196, 190, 168, 150, 139, 129, 117, 99, 78, 58, 3),
                          (197, 194, 176, 156, 141, 133, 121, 107, 88, 64, 56, 3)),
    ("deit_small", 3.1): ((197, 197, 194, 180, 160, 147, 137, 129, 115, 92, 76, 3),
                          (197, 196, 186, 164, 150, 141, 133, 121, 103, 78, 68, 3)),
}

#: the published schedules by name, ``"deit_small_2.9"`` etc.: the templates ``keep_ratio`` can scale
TEMPLATES: dict[str, tuple[str, float]] = {f"{model}_{gflops}": (model, gflops) for model, gflops in PUBLISHED}

#: schedule value of a block after the first reduction that removes nothing: below 1, so that it
#: still attends with the merged sizes
SIZED_ONLY = 1.0 - 1e-6


def published_schedule(model: str, gflops: float) -> dict[str, tuple[float, ...]]:
    """DiffRate's searched schedule for ``model`` (``"deit_tiny"`` or ``"deit_small"``) at
    ``gflops``, as ``pruned`` and ``merged`` options (shares of the 196 patches)."""
    if (model, gflops) not in PUBLISHED:
        raise InvalidOptionError(f"DiffRate published no schedule for {model} at {gflops} GFLOPs; it has "
                                 f"{', '.join(f'{m} {g}' for m, g in PUBLISHED)}")
    pruned, merged = PUBLISHED[model, gflops]
    return {"pruned": _shares(pruned), "merged": _shares(merged)}


def _shares(counts: tuple[int, ...]) -> tuple[float, ...]:
    """Token counts with the class token, out of 197, as shares of the 196 patches."""
    return tuple((count - 1) / 196 for count in counts)


@dataclasses.dataclass
class DiffRateConfig(ScoringConfig):
    """Options of ``diffrate``.

    Attributes:
        keep_ratio: mean share of the patches left after each block's merge, along the
            ``template`` schedule scaled (used when ``pruned`` and ``merged`` are None).
        template: the published schedule ``keep_ratio`` scales (a key of :data:`TEMPLATES`;
            the default, DeiT-S at 2.9 GFLOPs, is the paper's headline setting).
        pruned: per block, the share of the pass's initial patches left after pruning.
        merged: per block, the share left after merging (at most ``pruned``'s).
        scorer: whose attention ranks the patches, see :class:`~tokenpatch.core.method.ScoringConfig`
            (the class token's, the paper's rule; the mean patch query's on a model without one).
    """

    keep_ratio: float = 0.6054  # the mean share after merging of DiffRate's DeiT-S 2.9 GFLOPs schedule
    template: str = "deit_small_2.9"
    pruned: Optional[tuple[float, ...]] = None
    merged: Optional[tuple[float, ...]] = None

    def validate(self, depth: int) -> None:
        super().validate(depth)
        if self.template not in TEMPLATES:
            raise InvalidOptionError(f"template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if (self.pruned is None) != (self.merged is None):
            raise InvalidOptionError("diffrate's pruned and merged schedules go together: give both or neither")
        for name in ("pruned", "merged"):
            shares = getattr(self, name)
            if shares is not None:
                if len(shares) != depth or not all(0 < share <= 1 for share in shares):
                    raise InvalidOptionError(f"{name} must give a share in (0, 1] for each of the {depth} blocks, "
                                             f"got {list(shares)}")
                setattr(self, name, tuple(float(share) for share in shares))
        # resolved here, once for this depth (not a dataclass field: not an option): a forward only reads it
        self._shares = (self.pruned, self.merged) if self.pruned is not None and self.merged is not None else (
            scaled_schedule(self.keep_ratio, depth, self.template))

    def shares(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per block, the shares of the patches left after pruning and after merging (after :meth:`validate`)."""
        return self._shares


@lru_cache(maxsize=256)
def scaled_schedule(keep_ratio: float, depth: int, template: str = "deit_small_2.9"
                    ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``template`` schedule's reductions stretched over ``depth`` blocks and scaled alike so
    that the share left after merging averages ``keep_ratio`` (every share at least 0; a block
    keeps one patch at least when it runs)."""
    pruned, merged = (_stretched(_shares(counts), depth) for counts in PUBLISHED[TEMPLATES[template]])

    def scaled(scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(tuple(max(0.0, 1.0 - (1.0 - share) * scale) for share in shares) for shares in (pruned, merged))

    low, high = 0.0, 1.0 / max(1e-9, 1.0 - max(merged))  # at high every block keeps nothing
    for _ in range(50):
        middle = (low + high) / 2
        if sum(scaled(middle)[1]) / depth > keep_ratio:
            low = middle
        else:
            high = middle
    return scaled(low)


def _stretched(shares: tuple[float, ...], depth: int) -> list[float]:
    """``shares`` of 12 blocks read at ``depth`` evenly spaced points (linear interpolation)."""
    if depth == 1:
        return [shares[-1]]
    points = [i * (len(shares) - 1) / (depth - 1) for i in range(depth)]
    return [shares[int(p)] + (shares[min(int(p) + 1, len(shares) - 1)] - shares[int(p)]) * (p - int(p))
            for p in points]


@register_method
class DiffRate(Method[DiffRateConfig, MergeState]):
    name = "diffrate"
    summary = "DiffRate: prune by class attention, then merge, at searched per-block rates"
    config_class = DiffRateConfig

    def start_pass(self, config: DiffRateConfig) -> MergeState:
        return MergeState()

    def calibration_options(self, config: DiffRateConfig) -> list[dict[str, Any]]:
        """Every published schedule as a template (``calibrate`` scales each to the budget)."""
        return [{"template": name} for name in TEMPLATES] if config.pruned is None else [{}]

    def budget_options(self, config: DiffRateConfig, keep_ratio: float) -> dict[str, Any]:
        if config.pruned is not None:
            raise InvalidOptionError("a MAC budget chooses diffrate's rates through keep_ratio; patch with "
                                     "pruned=None and merged=None to use it")
        return {"keep_ratio": keep_ratio}

    def schedule(self, config: DiffRateConfig, depth: int) -> list[Optional[float]]:
        """Per block, the share left after its merge, from the first block that removes a
        patch on (later blocks attend with the merged sizes even where they remove none)."""
        if config.pruned is None and config.keep_ratio >= 1.0:
            return [None] * depth
        merged = config.shares()[1]
        first = next((block for block, share in enumerate(merged) if share < 1.0), depth)
        return [None if block < first else min(share, SIZED_ONLY) for block, share in enumerate(merged)]

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[MergeState], block: int, ratio: float,
                     config: DiffRateConfig) -> Tensor:
        p, attention_tokens = state.num_prefix, x.shape[1]
        x, q, k, _, bias = sized_attention(view, x, state, proportional=True)
        patches, initial = int(x.shape[1]) - p, int(state.initial_patches)
        pruned, merged = (shares[block] for shares in config.shares())
        kept = min(patches, max(1, round(pruned * initial)))
        attended = min(kept, max(1, round(merged * initial)))
        if attended < patches:
            scores = patch_scores(view, q, k, state, config.scorer, key_bias=bias)
            state.record_scores(block, SCORE_NAMES[scorer_rule(config.scorer, state)], scores)
            x = _prune_and_merge(x, scores, state, kept, attended)
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)

    def restore_grid(self, x: Tensor, state: PassState[MergeState]) -> Tensor:
        """Merged tokens copied back to every patch they stand for, pruned ones as they left."""
        return restore_merged_grid(x, state)


def _prune_and_merge(x: Tensor, scores: Tensor, state: PassState[MergeState], kept: int, attended: int) -> Tensor:
    """Keep the ``kept`` most attended patches of (B, N, C) ``x`` by (B, T) ``scores``, merge those
    ranked below ``attended`` into their most similar token; update sizes, positions and groups.

    Returns:
        (B, P + attended, C): the prefix and the ``attended`` most attended patches, in position order.
    """
    p = state.num_prefix
    ranking = scores.argsort(dim=1, descending=True)
    targets = ranking[:, :attended].sort(dim=1).values  # the tokens that stay, in position order
    joining = ranking[:, attended:kept]
    index, joining_index = kept_index(state, targets), joining + p  # into x
    sizes = state.own.sizes if state.own.sizes is not None else x.new_ones(x.shape[:2])
    # the official rule matches on the tokens themselves, under no_grad, and shields the class token,
    # the only prefix token of the models it patches
    into, similarity = most_similar_kept(x, joining_index, index, p)
    merged = mean_with_joined(gather_tokens(x, index), gather_tokens(x, joining_index), into)[0]
    # a negative similarity adds nothing (the official code would shrink the size, down to a log of 0 or less)
    grown = sizes.gather(1, index).scatter_add(1, into, sizes.gather(1, joining_index) * similarity.clamp_min(0))
    state.select(index, x)  # remembers the pruned tokens for a dense output
    state.own.sizes = grown

    def moved() -> Tensor:
        moved_to = torch.full_like(scores, -1, dtype=torch.long)
        moved_to = moved_to.scatter(1, targets, torch.arange(attended, device=x.device).expand(x.shape[0], -1))
        return moved_to.scatter(1, joining, into - p)

    follow_groups(state, moved)
    return merged
