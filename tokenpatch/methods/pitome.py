"""PiToMe: merge tokens only inside large clusters of similar tokens, guided by an energy score.

Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024
(arXiv:2405.16148); official code ``hchautran/PiToMe`` (``algo/pitome/merge.py``,
``algo/pitome/patch/deit.py``), whose vision inference rule this follows. In every block, after
the attention and before the MLP, with the head-averaged keys as the metric (prefix tokens left
out and never merged):

- each patch gets an energy ``mean_j ELU(cos(k_i, k_j) - m)``, high when many similar patches
  surround it; the margin falls with depth, ``m = 0.75 - 0.75 * block / depth``;
- the patches are ordered by decreasing energy and ``r = floor(T - T * keep_ratio)`` of the T
  current patches merge (at most half):
  - in the first ``ceil(depth / 2)`` blocks, by ToMe's bipartite soft matching over the energy
    order (alternate patches into A and B, the ``r`` A patches with the most similar partners
    merge);
  - in the later blocks, only the ``2r`` highest-energy patches take part: alternately A and B,
    every A patch merges into its most similar B patch; the isolated, low-energy patches are
    protected;
- merged features are size-weighted averages (the official DeiT patch applies no proportional
  attention; ``proportional_attention=True`` adds ToMe's ``log(size)`` bias).

``keep_ratio`` is the official per-block ``ratio``: the share of its patches each block keeps,
so the count shrinks geometrically; 1.0 merges nothing and is the dense model, exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.blocks import BlockView
from ..core.merging import (MergeState, arrange, bipartite_matching, destinations, follow_groups, merge_tokens,
                            restore_merged_grid, sized_attention)
from ..core.method import Method, MethodConfig
from ..core.ops import gather_tokens
from ..core.pieces import mlp_residual
from ..core.registry import register_method
from ..core.state import PassState


@dataclasses.dataclass
class PiToMeConfig(MethodConfig):
    """Options of ``pitome``.

    Attributes:
        keep_ratio: share of its current patches each block keeps (the official ``ratio``).
        margin: the energy margin of block 0, falling linearly to 0 at the depth (official 0.75).
        proportional_attention: add ``log(size)`` to the attention logits of merged tokens
            (off in the official DeiT patch).
    """

    keep_ratio: float = 0.9
    margin: float = 0.75
    proportional_attention: bool = False


def energy(metric: Tensor, margin: float) -> Tensor:
    """(B, T) energy of (B, T, D) tokens: the mean over all tokens of ``ELU(cosine - margin)``."""
    unit = F.normalize(metric, dim=-1)
    return F.elu(unit @ unit.transpose(1, 2) - margin).mean(dim=-1)


@register_method
class PiToMe(Method[PiToMeConfig, MergeState]):
    name = "pitome"
    summary = "PiToMe: energy-guided merging that protects isolated tokens (spectrum-preserving)"
    config_class = PiToMeConfig
    variants = {"proportional_attention": {"proportional_attention": True}}

    def start_pass(self, config: PiToMeConfig) -> MergeState:
        return MergeState()

    def schedule(self, config: PiToMeConfig, depth: int) -> list[Optional[float]]:
        return [None if config.keep_ratio >= 1.0 else config.keep_ratio] * depth

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[MergeState], block: int, ratio: float,
                     config: PiToMeConfig) -> Tensor:
        p, attention_tokens = state.num_prefix, x.shape[1]
        x, _, k, _, _ = sized_attention(view, x, state, config.proportional_attention)
        patches = int(x.shape[1]) - p  # int: shapes are tensors while fvcore traces
        r = min(math.floor(patches - patches * ratio), patches // 2)
        if r > 0:
            margin = config.margin - config.margin * block / state.depth
            x = self._merge(x, k.mean(dim=1), state, r, margin, every_patch=block < math.ceil(state.depth / 2))
        state.record(block, attention_tokens, x.shape[1])
        return mlp_residual(view, x)

    def restore_grid(self, x: Tensor, state: PassState[MergeState]) -> Tensor:
        """Each merged token copied back to every patch it stands for."""
        return restore_merged_grid(x, state)

    @staticmethod
    def _merge(x: Tensor, keys: Tensor, state: PassState[MergeState], r: int, margin: float,
               every_patch: bool) -> Tensor:
        """Merge ``r`` patches of (B, N, C) ``x`` by energy order of their (B, N, D) ``keys``; update the state.

        With ``every_patch`` all patches take part in the bipartite matching; otherwise only the
        ``2r`` highest-energy ones, and each of their A half merges.
        """
        p = state.num_prefix
        sizes = state.own.sizes if state.own.sizes is not None else x.new_ones(x.shape[:2])
        order = energy(keys[:, p:], margin).argsort(dim=1, descending=True)  # (B, T) patches by falling energy
        patches, metric = gather_tokens(x[:, p:], order), gather_tokens(keys[:, p:], order)
        patch_sizes, positions = sizes[:, p:].gather(1, order), state.positions[:, p:].gather(1, order)
        taking_part = patches.shape[1] if every_patch else 2 * r
        matching = bipartite_matching(metric[:, :taking_part], r)
        merged, merged_sizes = merge_tokens(patches[:, :taking_part], patch_sizes[:, :taking_part], matching)
        protected = patches.shape[1] - taking_part  # the low-energy patches, left as they are, in front
        state.own.sizes = torch.cat([sizes[:, :p], patch_sizes[:, taking_part:], merged_sizes], dim=1)
        state.positions = torch.cat([state.positions[:, :p], positions[:, taking_part:],
                                     arrange(positions[:, :taking_part], matching)], dim=1)

        def moved() -> Tensor:
            by_rank = torch.cat([destinations(matching, taking_part) + protected,  # new index of each energy rank
                                 torch.arange(protected, device=x.device).expand(x.shape[0], -1)], dim=1)
            return torch.empty_like(by_rank).scatter_(1, order, by_rank)

        follow_groups(state, moved)
        return torch.cat([x[:, :p], patches[:, taking_part:], merged], dim=1)
