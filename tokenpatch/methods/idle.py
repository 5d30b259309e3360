"""IdleViT: selected tokens compute, the others idle and may be selected again later.

Xu et al., "IdleViT: Efficient Vision Transformer via Token Idle and Token Cut Loss",
AJCAI 2023 (arXiv:2310.05654); official code ``Ackesnal/IdleViT``. From a start block on, each
block picks the class/prefix tokens plus the top-k patches; only they run attention (keys
restricted to the selected set) and the MLP. The other tokens pass through unchanged, so a later
block can select them again and the output keeps all N tokens.

The official inference rule (``infer.py`` and ``vit.py`` of the official code; its training
script ``main.py`` idles blocks 4-11 instead, and we follow the inference script) is
``idle_update="unchanged"``: idle blocks 3..11 of 12 (from a quarter of the depth on), keeping
``int(r * patches)``, ``int(r**2 * patches)``, ``int(r**3 * patches)`` of the patches in the
three thirds of them (``r = 0.7``), and every idle block ranks the patches afresh by the head
mean of its own raw class-token logits ``q_cls . k`` against all tokens (no softmax). That rule
is made for weights fine-tuned with it: on a pretrained model it loses 16 top-1 points at 65 % of
the MACs on the shared DeiT-Tiny. It is the rule the authors' checkpoints load with
(:func:`~tokenpatch.checkpoint.load_official`), the ``idlevit`` fine-tuning recipe's, and the
rule of a :func:`~tokenpatch.save` file written before the option existed.

The default, ``idle_update="merged"``, is ours (not in the paper), for pretrained weights: the
same selection and schedule, but the idle tokens take part through the selected ones. Each idle
token joins its most similar selected patch (cosine of head-averaged keys, as ToMe matches
tokens: Bolya et al., ICLR 2023), the selected token computes on their mean with ToMe's
proportional attention, and the block's change to that mean moves the selected token and every
idle token it took. Idle tokens still pass through, stay in place and may be selected again,
now from an up-to-date state; with them, the first idle block's ranking is kept for the pass
(``score=None`` means ``"fixed"`` here, ``"fresh"`` with ``idle_update="unchanged"``). Measured on
the shared DeiT-Tiny at 65 % of the MACs (docs/benchmarks/training-free.md): 76.4 top-1 against 77.0
unpatched at 224 px, 79.4 against 79.2 at 288 px; the official rule 60.6 and 64.0.

Other deviations, kept as options:

- ``score="fixed"`` with ``idle_update="unchanged"``: the first idle block's scores, reused by every
  later block (nested selections under the geometric schedule). The selected tokens then stay
  gathered from block to block and the idle ones are written back once, after the last block
  (same outputs as writing back in every block, fewer copies).
- ``ranking="softmax"``: rank by the head mean of the softmax probabilities (EViT's score).
- ``start_block`` and ``schedule="constant"``: other layers and one keep ratio for all.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from ..core.blocks import BlockView
from ..core.merging import mean_with_joined, most_similar_kept
from ..core.method import LossTerm, Method, ScoringConfig, check_block, check_positive
from ..core.ops import complement_positions, gather_heads, gather_tokens, scatter_tokens, top_k_positions
from ..core.pieces import (SCORE_NAMES, attend, attention_residual, attention_with_projections, keep_tokens, kept_index,
                           kept_queries, mean_attention_logits, mlp_residual, patch_scores, scorer_rule,
                           scoring_queries_and_keys)
from ..core.registry import register_method
from ..core.runner import last_training_outputs
from ..core.state import PassState

Score = Literal["fresh", "fixed"]


@dataclasses.dataclass
class IdleConfig(ScoringConfig):
    """Options of ``idle``.

    Attributes:
        keep_ratio: fraction r of the patches a reducing block computes on.
        start_block: first reducing block; None means a quarter of the depth (3 for 12 blocks,
            the official inference script's).
        schedule: ``"geometric"`` (official) splits the reducing blocks into thirds keeping r,
            r**2, r**3; ``"constant"`` keeps r everywhere.
        score: ``"fresh"`` (official) ranks at every reducing block with its own scores;
            ``"fixed"`` reuses the first reducing block's; None: ``"fixed"`` with merged idle
            tokens, ``"fresh"`` otherwise (:func:`score_rule`).
        ranking: ``"logits"`` (official) ranks by the head mean of the raw class-token logits;
            ``"softmax"`` by the head mean of the attention probabilities.
        idle_update: ``"merged"`` (ours, the default): idle tokens join their most similar
            selected patch for the block's computation and move with it;
            ``"unchanged"`` (official): they pass through unchanged.
        cut_weight: fine-tuning weight of the token-cut loss (:class:`TokenCutLoss`; 0: off).
        scorer: whose attention ranks the patches, see :class:`~tokenpatch.core.method.ScoringConfig`.
    """

    keep_ratio: float = 0.7
    start_block: Optional[int] = None
    schedule: Literal["constant", "geometric"] = "geometric"
    score: Optional[Score] = None
    ranking: Literal["logits", "softmax"] = "logits"
    idle_update: Literal["merged", "unchanged"] = "merged"
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
    """First reducing block when none is given: a quarter of the depth, at least 1."""
    return min(depth - 1, max(1, depth // 4))


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
    official_options = {"idle_update": "unchanged"}
    variants = {"official": {"idle_update": "unchanged"}, "official_fixed": {"idle_update": "unchanged", "score": "fixed"},
                "fresh": {"score": "fresh"}, "softmax_constant": {"ranking": "softmax", "schedule": "constant"}}

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
        score = score_rule(config)
        if score == "fixed" and config.idle_update == "unchanged" and "attention" not in state.collect:
            return _working_set_block(view, x, state, block, ratio, config)
        keep = max(1, int(ratio * (x.shape[1] - state.num_prefix)))
        xn = queries = keys = None
        if score == "fresh" or state.own.scores is None:
            xn = view.norm1(x)
            queries, keys = scoring_queries_and_keys(view, xn, state, config.scorer)
            scores = patch_scores(view, queries, keys, state, config.scorer, probabilities=config.ranking == "softmax")
        else:
            scores = state.own.scores
        selected, index = keep_tokens(x, state, top_k_positions(scores, keep))
        state.record_scores(block, SCORE_NAMES[scorer_rule(config.scorer, state)], scores)
        if score == "fixed":
            state.own.scores = scores.detach()
        if "attention" in state.collect:
            _leave_token_cut_inputs(view, x, state, index)
        state.record(block, index.shape[1], x.shape[1], computed=index)
        if config.idle_update == "merged" and index.shape[1] < x.shape[1]:
            if keys is None:
                keys = view.key(view.norm1(x), state.positions)
            return _merged_block(view, x, selected, keys, index, state)
        scored = None if xn is None else (xn, queries, keys, index)
        selected = mlp_residual(view, _attention_among(view, selected, state.positions.gather(1, index), scored))
        return scatter_tokens(x, index, selected)


def score_rule(config: IdleConfig) -> Score:
    """The ranking rule ``config`` runs: its ``score``, or when None ``"fixed"`` with merged idle
    tokens and ``"fresh"`` (official) with idle tokens left unchanged."""
    if config.score is not None:
        return config.score
    return "fixed" if config.idle_update == "merged" else "fresh"


def _merged_block(view: BlockView, x: Tensor, selected: Tensor, keys: Tensor, index: Tensor,
                  state: PassState) -> Tensor:
    """A reducing block under ``idle_update="merged"``: the (B, N, C) tokens ``x`` with the (B, K, C)
    ``selected`` ones at ``index`` computing for the idle ones too.

    Each idle token joins the selected patch whose head-averaged key in (B, H, N, D) ``keys`` is
    most like its own (cosine; prefix tokens take no idle token). A selected token computes on
    the mean of itself and the idle tokens it took, and its attention logit gets ``log`` of how
    many tokens that is (ToMe's proportional attention); the change the block makes to that mean
    is added to the selected token and to each idle token it took. Idle tokens therefore keep
    moving with the tokens like them and may be selected again from where they are.
    """
    idle = complement_positions(index, x.shape[1])
    taker = most_similar_kept(keys.mean(dim=1), idle, index, state.num_prefix)[0]  # (B, N - K): into the selected
    idle_tokens = gather_tokens(x, idle)
    means, sizes = mean_with_joined(selected, idle_tokens, taker)
    positions = state.positions.gather(1, index)
    change = mlp_residual(view, attention_with_projections(view, means, positions, key_bias=sizes.log())[0]) - means
    x = scatter_tokens(x, idle, idle_tokens + gather_tokens(change, taker))
    return scatter_tokens(x, index, selected + change)


def _attention_among(view: BlockView, selected: Tensor, positions: Tensor,
                     scored: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None) -> Tensor:
    """``selected + attn(norm1(selected))`` with the (B, K, C) selected tokens at (B, K) ``positions``
    attending among themselves. ``scored``: the whole sequence's ``norm1``, scoring queries and
    keys and the (B, K) index of the selected tokens in it, when scoring already projected them."""
    if scored is None:
        return attention_residual(view, selected, positions)
    xn, queries, keys, index = scored
    xn_sel = gather_tokens(xn, index)
    q = kept_queries(view, queries, xn_sel, positions, index)
    attended = attend(view, q, gather_heads(keys, index), view.value(xn_sel), xn_sel, query_positions=positions,
                      key_positions=positions)
    return view.add_attention(selected, attended)


def _working_set_block(view: BlockView, x: Tensor, state: PassState[IdleState], block: int, ratio: float,
                       config: IdleConfig) -> Tensor:
    """A reducing block under ``score="fixed"``, whose selections are nested: the selected tokens
    stay gathered from block to block (the working set, the block's (B, W, C) input after the
    first) and the idle ones are written back once, after the last block.

    Same tokens, same order and same arithmetic as selecting from the whole sequence in every
    block and writing back each time; only the copies are gone.
    """
    p, keep = state.num_prefix, max(1, int(ratio * state.initial_patches))
    scored = None
    if state.own.scores is None:  # the first reducing block: x is the whole sequence, rank every patch once
        xn = view.norm1(x)
        queries, keys = scoring_queries_and_keys(view, xn, state, config.scorer)
        state.own.scores = patch_scores(view, queries, keys, state, config.scorer,
                                        probabilities=config.ranking == "softmax").detach()
        scored = (xn, queries, keys)
    scores = state.own.scores.gather(1, state.positions[:, p:] - p)  # the current patches'
    state.record_scores(block, SCORE_NAMES[scorer_rule(config.scorer, state)], scores)
    shrinks = keep < x.shape[1] - p  # nested: the top-k of the same scores
    if shrinks:
        index = kept_index(state, top_k_positions(scores, keep))
        state.select(index, x, remember=True)
        x = gather_tokens(x, index)
    reuse = (*scored, index) if scored is not None and shrinks else None  # the kept tokens' keys are projected
    x = mlp_residual(view, _attention_among(view, x, state.positions, reuse))
    state.record(block, x.shape[1], state.num_tokens)
    return state.rejoin(x) if block == state.depth - 1 else x


def _leave_token_cut_inputs(view: BlockView, x: Tensor, state: PassState, index: Tensor) -> None:
    """For :class:`TokenCutLoss`: all-token attention logits and the (B, N) selected mask."""
    selected = x.new_zeros(x.shape[:2]).scatter(1, index, 1.0)
    state.add_aux("token_cut", (mean_attention_logits(view, view.norm1(x), state.positions), selected))


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
