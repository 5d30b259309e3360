"""IdleViT: selected tokens compute, the others idle and may be selected again later.

Xu et al., "IdleViT: Efficient Vision Transformer via Token Idle and Token Cut Loss",
AJCAI 2023 (arXiv:2310.05654). From a start block on, each block picks the class/prefix tokens
plus the top-k patches; only they run attention (keys restricted to the selected set) and the
MLP. The other tokens pass through unchanged, so a later block can select them again and the
output keeps all N tokens.

Score sources (``score=``):

- ``"fresh"`` (the paper's inference rule): at every reducing block, the class-token query of
  that block against the keys of *all* tokens. Costs a key projection of every token.
- ``"previous"``: the class-token attention of the previous reducing block; idle tokens keep
  their stale score. Cheap, but the scores of different blocks are normalised over different
  sets, so the selection churns (measured: large accuracy loss without fine-tuning).
- ``"carried"``: like ``"previous"``, but the new attention is renormalised to the mass the
  selected tokens had and averaged with their old score, so idle and selected scores stay
  comparable and the selection moves slowly.
- ``"fixed"`` (the default): the first reducing block's fresh scores, reused by every later
  block (nested selections under the geometric schedule). Without fine-tuning this is by far
  the most accurate rule at a given MAC budget; ``benchmarks/accuracy.py`` prints the table.

The default start block is a sixth of the depth (block 2 of 12), one block earlier than the
paper's 3: at matched MACs it measured about 0.7 points more top-1 on the shared DeiT-Tiny.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from ..core.blocks import BlockView
from ..core.method import LossTerm, Method, ScoringConfig, check_block, check_positive
from ..core.ops import gather_heads, gather_tokens, scatter_tokens, top_k_positions
from ..core.pieces import (SCORE_NAMES, attend, keep_tokens, mean_attention_logits, mlp_residual, patch_scores,
                           scorer_rule)
from ..core.registry import register_method
from ..core.runner import last_training_outputs
from ..core.state import PassState

Score = Literal["fixed", "fresh", "previous", "carried"]


@dataclasses.dataclass
class IdleConfig(ScoringConfig):
    """Options of ``idle``.

    Attributes:
        keep_ratio: fraction r of the patches a reducing block computes on.
        start_block: first reducing block; None means a sixth of the depth (2 for 12 blocks;
            the paper starts at 3).
        schedule: ``"constant"`` keeps r everywhere; ``"geometric"`` splits the reducing blocks
            into thirds keeping r, r**2, r**3 (the paper's schedule).
        score: how patches are ranked; see the module docstring.
        cut_weight: fine-tuning weight of the token-cut loss (:class:`TokenCutLoss`; 0: off).
        scorer: whose attention ranks the patches, see :class:`~tokenpatch.core.method.ScoringConfig`.
    """

    keep_ratio: float = 0.5
    start_block: Optional[int] = None
    schedule: Literal["constant", "geometric"] = "constant"
    score: Score = "fixed"
    cut_weight: float = 0.0

    def validate(self, depth: int) -> None:
        super().validate(depth)
        check_block("start_block", self.start_block, depth)
        check_positive("cut_weight", self.cut_weight, allow_zero=True)


@dataclasses.dataclass
class IdleState:
    """Per pass: the scores the next reducing block ranks patches by (None before the first)."""

    scores: Optional[Tensor] = None


def default_start_block(depth: int) -> int:
    """First reducing block when none is given: a sixth of the depth, at least 1."""
    return min(depth - 1, max(1, round(depth / 6)))


def keep_ratios(config: IdleConfig, depth: int) -> list[Optional[float]]:
    """Per-block keep ratio of the idle schedule (None before the start block)."""
    start = config.start_block if config.start_block is not None else default_start_block(depth)
    reducing = depth - start
    ratios: list[Optional[float]] = [None] * start
    for i in range(reducing):
        third = i * 3 // reducing if config.schedule == "geometric" else 0
        ratios.append(config.keep_ratio ** (third + 1))
    return ratios


@register_method
class Idle(Method[IdleConfig, IdleState]):
    name = "idle"
    summary = "IdleViT: top-k tokens compute, the rest idle and can return"
    config_class = IdleConfig
    variants = {"geometric": {"schedule": "geometric"}, "fresh": {"score": "fresh"}, "previous": {"score": "previous"},
                "carried": {"score": "carried"}}

    def schedule(self, config: IdleConfig, depth: int) -> list[Optional[float]]:
        return keep_ratios(config, depth)

    def start_pass(self, config: IdleConfig) -> IdleState:
        return IdleState()

    def training_signals(self, config: IdleConfig) -> frozenset[str]:
        return frozenset({"attention"}) if config.cut_weight > 0 else frozenset()

    def training_losses(self, config: IdleConfig) -> list[tuple[float, LossTerm]]:
        return [(config.cut_weight, lambda model, task_loss: TokenCutLoss()(model))] if config.cut_weight > 0 else []

    def reduce_block(self, view: BlockView, x: Tensor, state: PassState[IdleState], block: int, ratio: float,
                     config: IdleConfig) -> Tensor:
        p = state.num_prefix
        keep = max(1, int(ratio * (x.shape[1] - p)))
        if config.score == "fresh" or state.own.scores is None:
            xn = view.norm1(x)
            keys = view.key(xn, state.positions)
            # the class token's query alone, or every patch's (their mean scores; the selected reuse theirs)
            by_class = scorer_rule(config.scorer, state) == "class_token"
            queries = view.query(xn[:, :1] if by_class else xn, state.positions[:, :1] if by_class else state.positions)
            scores = patch_scores(view, queries, keys, state, config.scorer)
            keep_positions = top_k_positions(scores, keep)
            selected, index = keep_tokens(x, state, keep_positions)
            positions = state.positions.gather(1, index)
            xn_sel = gather_tokens(xn, index)
            q = view.query(xn_sel, positions) if by_class else gather_heads(queries, index)
            k, v = gather_heads(keys, index), view.value(xn_sel)
        else:
            scores = state.own.scores
            keep_positions = top_k_positions(scores, keep)
            selected, index = keep_tokens(x, state, keep_positions)
            positions = state.positions.gather(1, index)
            xn_sel = view.norm1(selected)
            q, k, v = view.qkv(xn_sel, positions)
        state.record_scores(block, SCORE_NAMES[scorer_rule(config.scorer, state)], scores)
        if config.score in ("previous", "carried"):
            new_attention = patch_scores(view, q, k, state, config.scorer)
            state.own.scores = _updated_scores(config.score, scores, keep_positions, new_attention).detach()
        elif config.score == "fixed":
            state.own.scores = scores.detach()
        if "attention" in state.collect:
            _leave_token_cut_inputs(view, x, state, index)
        attended = attend(view, q, k, v, xn_sel, query_positions=positions, key_positions=positions)
        selected = mlp_residual(view, view.add_attention(selected, attended))
        state.record(block, index.shape[1], x.shape[1], computed=index)
        return scatter_tokens(x, index, selected)


def _leave_token_cut_inputs(view: BlockView, x: Tensor, state: PassState, index: Tensor) -> None:
    """For :class:`TokenCutLoss`: all-token attention logits and the (B, N) selected mask."""
    selected = x.new_zeros(x.shape[:2]).scatter(1, index, 1.0)
    state.add_aux("token_cut", (mean_attention_logits(view, view.norm1(x), state.positions), selected))


def _updated_scores(rule: str, scores: Tensor, keep_positions: Tensor, new_selected: Tensor) -> Tensor:
    """Scores for the next block after the selected patches got a new attention ``new_selected``.

    Args:
        scores: (B, M) scores used for this block's selection.
        keep_positions: (B, K) selected patches.
        new_selected: (B, K) class-token attention of the selected patches in this block.
    """
    old_selected = scores.gather(1, keep_positions)
    if rule == "carried":
        # Same total mass as before over the selected set, then a running mean.
        mass = old_selected.sum(1, keepdim=True) / new_selected.sum(1, keepdim=True).clamp_min(1e-12)
        new_selected = 0.5 * (old_selected + new_selected * mass)
    return scores.scatter(1, keep_positions, new_selected)


class TokenCutLoss(nn.Module):
    """IdleViT's token-cut loss: attention should not cross between selected and idle tokens.

    Xu et al., AJCAI 2023 (arXiv:2310.05654). At each reducing block the head-averaged
    attention of all tokens, ``W = softmax(mean_h(q k^T))``, is split by the block's selection
    into the selected set S and the idle set I, in the spirit of a normalised graph cut: the
    attention mass each token sends across the cut (to the other set, the class token
    excepted) is pushed to 0, and the mass a selected token keeps inside S is pushed to 1.
    Selected tokens then lose little by attending within S only, which is what idle inference
    does. Fine-tuning adds it with weight ``cut_weight`` (an option of ``idle``); it asks the
    model to produce the all-token attention (an extra N x N map per reducing block, in
    training only).
    """

    def forward(self, model: nn.Module) -> Tensor:
        """Scalar loss from this thread's last training-mode pass of an ``idle`` model."""
        terms = []
        for logits, selected in last_training_outputs(model, "token_cut", "TokenCutLoss"):
            weights = logits.softmax(dim=-1)  # (B, N, N)
            rows, cols = selected.unsqueeze(2), selected.unsqueeze(1)
            crossing = (rows - cols).abs()
            crossing[:, :, 0] = 0.0  # every token may attend to the class token
            across = (weights * crossing).sum(-1)
            within_selected = (weights * rows * cols).sum(-1)
            terms.append(across.pow(2).mean() + (within_selected - selected).pow(2).mean())
        return torch.stack(terms).mean()
