"""The reduced-token block pieces every method composes.

A method's block forward is a short composition of these functions: score, select
(``ops.top_k_positions``), compute on the selected tokens (:func:`attention_residual`,
:func:`mlp_residual`), then write back, drop, fuse or merge. At inference the attention always
runs on ``F.scaled_dot_product_attention``; attention scores come from
:func:`patch_scores` (one query's attention), never from a materialised N x N map. Only the
training-mode pieces (:func:`masked_block`, :func:`mean_attention_logits`) build that map,
because their losses or differentiable masks need it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import TokenPatchError
from .blocks import BlockView
from .ops import cls_attention, gather_heads, gather_tokens, prefix_positions
from .registry import fixed_count_methods
from .state import PassState


#: devices whose SDPA gets a key bias folded into the heads (:func:`fold_key_bias`) instead of as a mask:
#: CUDA's flash kernel refuses any mask; the CPU's takes one
FOLD_KEY_BIAS_ON = frozenset({"cuda"})
#: extra head channels that carry the bias (flash attention wants head sizes in multiples of 8)
_BIAS_CHANNELS = 8


def fold_key_bias(q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v with a per-key logit bias carried by extra head channels, so that attention
    needs no mask: ``scale * q'.k'_j = scale * q.k_j + key_bias_j`` exactly (the queries get a 1,
    the keys ``key_bias / scale``, the values zeros; drop the output's last channels after).

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); key_bias: (B, Nk).

    Returns:
        (B, H, Nq, D + 8), (B, H, Nk, D + 8), (B, H, Nk, D + 8).
    """
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    q_extra = q.new_zeros(b, h, nq, _BIAS_CHANNELS)
    q_extra[..., 0] = 1
    k_extra = k.new_zeros(b, h, nk, _BIAS_CHANNELS)
    k_extra[..., 0] = (key_bias / scale).to(k.dtype)[:, None, :]
    return (torch.cat([q, q_extra], dim=-1), torch.cat([k, k_extra], dim=-1),
            torch.cat([v, v.new_zeros(b, h, nk, _BIAS_CHANNELS)], dim=-1))


def attend(view: BlockView, q: Tensor, k: Tensor, v: Tensor, xn: Tensor, key_mask: Optional[Tensor] = None,
           key_bias: Optional[Tensor] = None, query_positions: Optional[Tensor] = None,
           key_positions: Optional[Tensor] = None) -> Tensor:
    """Multi-head attention on SDPA plus the output projection.

    Args:
        q: (B, H, Nq, D) queries; k, v: (B, H, Nk, D).
        xn: (B, Nq, C) normed query tokens (some blocks gate the output on them).
        key_mask: (B, Nk) bool, False for padding keys no query may attend to; None: all keys.
        key_bias: (B, Nk) float added to every query's logit for each key (ToMe's log-size
            bias); None: no bias. Folded into the heads on the devices of
            :data:`FOLD_KEY_BIAS_ON` (:func:`fold_key_bias`), so the flash kernel still runs, and
            passed to SDPA as an additive mask elsewhere.
        query_positions, key_positions: (B, Nq) and (B, Nk) original positions, for families
            whose attention has a position bias (:meth:`BlockView.attention_bias`).

    Returns:
        (B, Nq, C) attention-branch output, before the residual.
    """
    mask = view.attention_bias(query_positions, key_positions)
    head_size = q.shape[-1]
    if key_bias is not None and mask is None and key_mask is None and q.device.type in FOLD_KEY_BIAS_ON:
        q, k, v = fold_key_bias(q, k, v, key_bias, view.scale)
    elif key_bias is not None:
        bias = key_bias[:, None, None, :].to(q.dtype)
        mask = bias if mask is None else mask + bias
    if key_mask is not None:
        keep = key_mask[:, None, None, :]
        mask = keep if mask is None else mask.masked_fill(~keep, float("-inf"))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=view.attn_dropout, scale=view.scale)
    return view.attention_output(o[..., :head_size], xn)


def attention_with_projections(view: BlockView, x: Tensor, positions: Optional[Tensor] = None,
                               key_mask: Optional[Tensor] = None,
                               key_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First half of a block on all tokens, ``x + attn(norm1(x))``, also returning q, k and v.

    Args:
        x: (B, N, C) tokens.
        positions: (B, N) their original positions (``state.positions``); None: ``0..N-1``.
        key_mask, key_bias: see :func:`attend`.

    Returns:
        (B, N, C) tokens after the attention residual, and the (B, H, N, D) queries, keys and
        values it used (methods score tokens on them).
    """
    xn = view.norm1(x)
    q, k, v = view.qkv(xn, positions)
    return view.add_attention(x, attend(view, q, k, v, xn, key_mask, key_bias, positions, positions)), q, k, v


def attention_residual(view: BlockView, x: Tensor, positions: Optional[Tensor] = None,
                       key_mask: Optional[Tensor] = None) -> Tensor:
    """First half of a block on all (B, N, C) tokens of ``x`` at (B, N) ``positions``:
    ``x + attn(norm1(x))``; ``key_mask`` as in :func:`attend`."""
    return attention_with_projections(view, x, positions, key_mask)[0]


#: the trace's name for the scores each scorer gives (``ScoringConfig.scorer``)
SCORE_NAMES = {"class_token": "cls_attention", "mean_query": "mean_query_attention"}


def scorer_rule(scorer: str, state: PassState) -> str:
    """``"class_token"`` or ``"mean_query"``: the rule ``scorer`` (``"auto"`` included) means for this model."""
    if scorer == "auto":
        return "class_token" if state.class_token else "mean_query"
    return scorer


def patch_scores(view: BlockView, q: Tensor, k: Tensor, state: PassState, scorer: str,
                 key_mask: Optional[Tensor] = None, probabilities: bool = True,
                 key_bias: Optional[Tensor] = None) -> Tensor:
    """Head-averaged attention one scoring query pays every patch, without the N x N map.

    The query is the class token's (``"class_token"``) or the mean of the real patches' queries
    (``"mean_query"``: a token that attends like the average patch, so its attention tracks the
    attention each patch receives; no class token needed). See :func:`scorer_rule`.

    Args:
        q: (B, H, N, D) queries of the current tokens (with ``"class_token"``, (B, H, 1, D) of
            the class token alone is enough).
        k: (B, H, N, D) keys of the current tokens.
        key_mask: (B, N) bool, False for padding (left out of the mean and of the softmax).
        probabilities: softmax over all N keys before the head mean; False: the head mean of
            the scaled logits (see :func:`~tokenpatch.core.ops.cls_attention`).
        key_bias: (B, N) logit bias of the keys, as the block's attention has it (merged sizes).

    Returns:
        (B, N - P) scores of the patches.
    """
    p = state.num_prefix
    if scorer_rule(scorer, state) == "class_token":
        query = q[:, :, :1]
    elif key_mask is None:
        query = q[:, :, p:].mean(dim=2, keepdim=True)
    else:
        weights = key_mask[:, None, p:, None].to(q.dtype)
        query = (q[:, :, p:] * weights).sum(dim=2, keepdim=True) / weights.sum(dim=2, keepdim=True).clamp_min(1)
    return cls_attention(query, k, view.scale, key_mask, probabilities, key_bias)[:, p:]


def scoring_queries_and_keys(view: BlockView, xn: Tensor, state: PassState, scorer: str) -> tuple[Tensor, Tensor]:
    """What scoring needs before any token is dropped, without the queries of tokens that may go.

    Args:
        xn: (B, N, C) ``norm1`` of the current tokens.

    Returns:
        The scoring queries: (B, H, 1, D) of the class token, or (B, H, N, D) of every token for
        the mean-query scorer (:func:`patch_scores`); and the (B, H, N, D) keys of every token.
    """
    positions = state.positions
    by_class = scorer_rule(scorer, state) == "class_token"
    queries = view.query(xn[:, :1] if by_class else xn, positions[:, :1] if by_class else positions)
    return queries, view.key(xn, positions)


def scoring_projections(view: BlockView, x: Tensor, state: PassState,
                        scorer: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``norm1(x)`` of (B, N, C) ``x``, its scoring queries and keys (:func:`scoring_queries_and_keys`)
    and the (B, H, N, D) values of every token."""
    xn = view.norm1(x)
    queries, keys = scoring_queries_and_keys(view, xn, state, scorer)
    return xn, queries, keys, view.value(xn)


def kept_queries(view: BlockView, queries: Tensor, xn_kept: Tensor, kept_positions: Tensor,
                 index: Optional[Tensor] = None) -> Tensor:
    """(B, H, K, D) queries of the kept tokens, whose ``norm1`` is (B, K, C) ``xn_kept`` at
    ``kept_positions``: taken from the scoring ``queries`` where those are every token's (the
    mean-query scorer; ``index`` picks the kept ones, None: all), else projected."""
    if queries.shape[2] > 1:  # every token's; one row is the class token's alone (or a lone token's)
        return queries if index is None else gather_heads(queries, index)
    return view.query(xn_kept, kept_positions)


def drop_after_attention(view: BlockView, x: Tensor, xn: Tensor, queries: Tensor, k: Tensor, v: Tensor,
                         index: Tensor, state: PassState, key_mask: Optional[Tensor] = None,
                         counts: Optional[Tensor] = None) -> Tensor:
    """``x + attn(norm1(x))`` for the tokens kept at ``index``, attending to every token's keys.

    The rows of the dropped tokens are computed only when a block of the pass returns the full
    grid, where their state after this attention is what they leave with
    (:meth:`PassState.select`). Otherwise they are never projected, attended or added: a drop
    after the attention (EViT, ATS) costs only the kept rows, and the kept rows are the same.

    Args:
        x, xn: (B, N, C) tokens and their ``norm1``; ``queries``, ``k``, ``v`` from
            :func:`scoring_projections`.
        index: (B, K) the kept tokens' indices into ``x``.
        key_mask: (B, N) bool, False for padding keys.
        counts: see :meth:`PassState.select`.

    Returns:
        (B, K, C) the kept tokens after the attention residual.
    """
    positions = state.positions
    if state.keeps_grid:
        q = kept_queries(view, queries, xn, positions)
        attended = attend(view, q, k, v, xn, key_mask, query_positions=positions, key_positions=positions)
        x = view.add_attention(x, attended)
        state.select(index, x, counts)
        return gather_tokens(x, index)
    state.select(index, x, counts)
    xn_kept, kept_positions = gather_tokens(xn, index), positions.gather(1, index)
    q = kept_queries(view, queries, xn_kept, kept_positions, index)
    attended = attend(view, q, k, v, xn_kept, key_mask, query_positions=kept_positions, key_positions=positions)
    return view.add_attention(gather_tokens(x, index), attended)


def policy_softmax(logits: Tensor, key_keep: Tensor, eps: float = 1e-6) -> Tensor:
    """Attention probabilities over the kept keys only, differentiable in a soft or hard keep mask.

    DynamicViT's masked attention (Rao et al., NeurIPS 2021): ``exp(logits) * keep`` normalised
    per query, where every token always keeps itself so that no row is empty. Dropped tokens
    still compute, but nothing attends to them. Used in training, where tokens are masked
    rather than removed so that gradients reach the keep decisions.

    Args:
        logits: (B, H, N, N) attention logits.
        key_keep: (B, N) keep mask in [0, 1] over all N tokens (prefix tokens 1).

    Returns:
        (B, H, N, N) probabilities, rows summing to 1.
    """
    n = logits.shape[-1]
    eye = torch.eye(n, dtype=logits.dtype, device=logits.device)
    keep = key_keep[:, None, None, :].to(logits.dtype) * (1 - eye) + eye
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp() * keep
    return (weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)


def masked_block(view: BlockView, x: Tensor, key_keep: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """A whole block on all tokens with attention restricted to kept keys (:func:`policy_softmax`).

    Materialises the (B, H, N, N) map, so it is for training-mode passes only.

    Args:
        x: (B, N, C) tokens.
        key_keep: (B, N) keep mask over all tokens.
        positions: (B, N) original positions of the tokens; None: ``0..N-1``.

    Returns:
        (B, N, C) tokens.
    """
    xn = view.norm1(x)
    q, k, v = view.qkv(xn, positions)
    probs = policy_softmax(attention_logits(view, q, k, positions), key_keep)
    probs = F.dropout(probs, view.attn_dropout, training=view.attn_dropout > 0)
    return mlp_residual(view, view.add_attention(x, view.attention_output(probs @ v, xn)))


def attention_logits(view: BlockView, q: Tensor, k: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """(B, H, N, N) attention logits of (B, H, N, D) queries and keys of tokens at (B, N)
    ``positions``, position bias included; materialised, so for training-mode pieces only."""
    logits = (q * view.scale) @ k.transpose(-2, -1)
    bias = view.attention_bias(positions, positions)
    return logits if bias is None else logits + bias


def mean_attention_logits(view: BlockView, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """(B, N, N) head-averaged attention logits of normed tokens ``xn`` (B, N, C) at (B, N) ``positions``, for training losses."""
    return attention_logits(view, view.query(xn, positions), view.key(xn, positions), positions).mean(dim=1)


def mlp_residual(view: BlockView, x: Tensor) -> Tensor:
    """Second half of a block: ``x + mlp(norm2(x))``, (B, N, C) -> (B, N, C)."""
    return view.mlp_residual(x)


def full_block(view: BlockView, x: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """A whole block on all (B, N, C) tokens at (B, N) ``positions``, composed from the pieces;
    equals the block's own forward when the tokens are the whole sequence."""
    return mlp_residual(view, attention_residual(view, x, positions))


def padded_block(view: BlockView, x: Tensor, state: PassState) -> Tensor:
    """A whole block on a batch that may be padded: keys past ``state.counts[b]`` are masked out.

    With no padding (``state.counts`` None) this is :func:`full_block`. Padding tokens still
    compute, but no real token attends to them, so a sample's output is its output alone.
    """
    if state.counts is None:
        return full_block(view, x, state.positions)
    return mlp_residual(view, attention_residual(view, x, state.positions, key_mask=state.real_tokens(x.shape[1])))


def refuse_export(method: str) -> None:
    """Raise a clear error when ``torch.export`` (also behind ONNX export) traces a pass whose
    token counts are computed from the image: a data-dependent shape it cannot express."""
    if torch.compiler.is_exporting():
        raise TokenPatchError(
            f"{method} keeps a per-image number of tokens (computed from the data), which cannot be exported "
            f"with torch.export or ONNX; export a method whose counts are fixed: {', '.join(fixed_count_methods())}"
        )


def kept_index(state: PassState, keep_positions: Tensor) -> Tensor:
    """(B, P + K) indices of the prefix tokens plus the patches at (B, K) ``keep_positions``
    (counted from the first patch)."""
    prefix = prefix_positions(keep_positions.shape[0], state.num_prefix, keep_positions.device)
    return torch.cat([prefix, keep_positions + state.num_prefix], dim=1)


def keep_tokens(x: Tensor, state: PassState, keep_positions: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix tokens plus the patches at ``keep_positions``.

    Args:
        x: (B, N, C) tokens.
        keep_positions: (B, K) positions of patches to keep, counted from the first patch.

    Returns:
        (B, P + K, C) kept tokens and their (B, P + K) positions in ``x``.
    """
    index = kept_index(state, keep_positions)
    return gather_tokens(x, index), index
