"""PPT: per image and per block, prune the unimportant tokens or pool the similar ones.

Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers", 2023
(arXiv:2310.01812); official code ``xjwu1024/PPT`` (``ppt_deit.py``), whose inference rule this
follows. At a few blocks (1/4, 2/4, 3/4 of the depth: 3, 6, 9 of 12, the official
``--pp_loc_list``), after the attention residual and before the MLP, each patch gets ATS's
significance (the class token's attention times the value norm, normalised over the patches).
An image whose significances vary little (variance below ``threshold``) has no clearly
unimportant tokens, so ``r`` of its tokens are pooled by ToMe's bipartite merge (the official
split over the whole sequence, class token protected); otherwise its ``r`` least significant
patches are pruned and the rest stay in decreasing order of significance. Attention is
proportional to the merged sizes (the official ``--prop_attn``, on by default there).

Both branches remove the same ``r`` tokens, so counts are fixed and a batch needs no padding;
each image takes its own branch. ``r = round((1 - keep_ratio) * patches)`` of the pass's initial
patches in every PPT block (``r=`` sets it directly: the official DeiT-S setting is ``r=50`` with
``threshold=7e-5``), at most half of the current patches.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import Tensor

from ..core.blocks import BlockView
from ..core.merging import MergeState, bipartite_merge, follow_groups, restore_merged_grid, sized_attention
from ..core.method import Method, MethodConfig, check_blocks, check_positive, quarter_blocks
from ..core.ops import gather_tokens
from ..core.pieces import kept_index, mlp_residual, patch_scores
from ..core.registry import register_method
from ..core.state import PassState
from ..errors import InvalidOptionError
from .ats import significance

#: schedule value of the PPT blocks when ``r`` sets their count (any ratio below 1)
R_MARKER = 0.5


@dataclasses.dataclass
class PPTConfig(MethodConfig):
    """Options of ``ppt``.

    Attributes:
        keep_ratio: 1 minus the share of the initial patches each PPT block removes.
        r: tokens each PPT block removes, overriding ``keep_ratio`` (the official ``--r_tokens``).
        threshold: significance variance below which an image pools instead of pruning
            (the official DeiT-S value; the variance of shares of 1 scales as 1/patches**2).
        ppt_blocks: the PPT blocks; None means 1/4, 2/4, 3/4 of the depth ((3, 6, 9) for 12).
        proportional_attention: add ``log(size)`` to the attention logits of pooled tokens.
    """

    keep_ratio: float = 0.75
    r: Optional[int] = None
    threshold: float = 7e-5
    ppt_blocks: Optional[tuple[int, ...]] = None
    proportional_attention: bool = True

    def validate(self, depth: int) -> None:
        super().validate(depth)
        check_positive("r", self.r, allow_zero=True)
        check_positive("threshold", self.threshold, allow_zero=True)
        if self.ppt_blocks is not None:
            check_blocks("ppt_blocks", self.ppt_blocks, depth)

    def blocks(self, depth: int) -> tuple[int, ...]:
        """The PPT blocks, default resolved."""
        return self.ppt_blocks if self.ppt_blocks is not None else quarter_blocks(depth)


@register_method
class PPT(Method[PPTConfig, MergeState]):
    name = "ppt"
    summary = "PPT: per image, prune unimportant tokens or pool similar ones (by significance spread)"
    config_class = PPTConfig
    variants = {"pool_all": {"threshold": 1.0}, "prune_all": {"threshold": 0.0}}

    def start_pass(self, config: PPTConfig) -> MergeState:
        return MergeState()

    def budget_options(self, config: PPTConfig, keep_ratio: float) -> dict[str, Any]:
        if config.r is not None:
            raise InvalidOptionError("a MAC budget chooses ppt's r through keep_ratio; patch with r=None to use it")
        return {"keep_ratio": keep_ratio}

    def schedule(self, config: PPTConfig, depth: int) -> list[Optional[float]]:
        """``keep_ratio`` at the PPT blocks and after (sizes bias the attention); with ``r`` set, a marker."""
        if config.keep_ratio >= 1.0 or config.r == 0:
            return [None] * depth
        ratio = R_MARKER if config.r is not None else config.keep_ratio
        start = min(config.blocks(depth))
        return [ratio if i >= start else None for i in range(depth)]

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[MergeState], block: int, ratio: float,
                     config: PPTConfig) -> Tensor:
        p, attention_tokens = state.num_prefix, x.shape[1]
        x, q, k, v, bias = sized_attention(view, x, state, config.proportional_attention)
        patches = int(x.shape[1]) - p
        r = config.r if config.r is not None else round((1.0 - ratio) * int(state.initial_patches))
        r = min(r, patches // 2)
        if block in config.blocks(state.depth) and r > 0:
            scores = significance(patch_scores(view, q, k, state, "class_token", key_bias=bias), v[:, :, p:])
            state.record_scores(block, "significance", scores)
            x = self._prune_or_pool(x, k.mean(dim=1), scores, state, r, config.threshold)
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)

    def restore_grid(self, x: Tensor, state: PassState[MergeState]) -> Tensor:
        """Pooled tokens copied back to every patch they stand for, pruned ones as they left."""
        return restore_merged_grid(x, state)

    @staticmethod
    def _prune_or_pool(x: Tensor, keys: Tensor, scores: Tensor, state: PassState[MergeState], r: int,
                       threshold: float) -> Tensor:
        """Remove ``r`` patches of each image of (B, N, C) ``x``: pooled where its (B, T) ``scores``
        vary less than ``threshold``, pruned otherwise; update the state."""
        p, patches = state.num_prefix, scores.shape[1]
        sizes = state.own.sizes if state.own.sizes is not None else x.new_ones(x.shape[:2])
        pools = scores.var(dim=1) < threshold  # (B,)
        pooled = bipartite_merge(x, keys, sizes, state.positions, p, r)
        survivors = scores.topk(patches - r, dim=1).indices  # by decreasing significance, as the official code
        index = kept_index(state, survivors)
        positions = state.positions
        state.select(index, x)  # remembers the pruned tokens for a dense output

        def choose(pooled_value: Tensor, pruned_value: Tensor) -> Tensor:
            return torch.where(pools.view(-1, *([1] * (pruned_value.ndim - 1))), pooled_value, pruned_value)

        state.own.sizes = choose(pooled.sizes, sizes.gather(1, index))
        state.positions = choose(pooled.positions, positions.gather(1, index))

        def moved() -> Tensor:
            pruned = torch.full_like(scores, -1, dtype=torch.long).scatter(
                1, survivors, torch.arange(patches - r, device=x.device).expand(x.shape[0], -1))
            return choose(pooled.moved(), pruned)

        follow_groups(state, moved)
        return choose(pooled.tokens, gather_tokens(x, index))
