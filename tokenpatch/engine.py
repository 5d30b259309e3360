"""The reduced-token block pieces every method composes, and the state a forward pass carries.

A method's block forward is a short composition of these functions: score, select
(``ops.top_k_positions``), compute on the selected tokens (:func:`attention_residual`,
:func:`mlp_residual`), then write back, drop, fuse or merge. At inference the attention always
runs on ``F.scaled_dot_product_attention``; class-token scores come from
:func:`~tokenpatch.ops.cls_attention`, never from a materialised N x N map. Only the
training-mode pieces (:func:`masked_block`, :func:`mean_attention_logits`) build that map,
because their losses or differentiable masks need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.base import BlockView
from .errors import TokenPatchError
from .ops import cls_attention, gather_tokens, prefix_positions
from .trace import BlockRecord, ScoreRecord, Trace


@dataclass
class PassState:
    """What one forward pass carries from block to block.

    Attributes:
        num_prefix: number of prefix tokens P (class token first).
        num_tokens: tokens N entering block 0.
        depth: blocks in the model.
        positions: (B, N) original position of each current token; -1 for fused tokens.
        scores: (B, N - P) per-patch importance a method carries across blocks, or None.
        trace: where to record per-block token counts, or None.
        modules: the method's own trained modules (e.g. DynamicViT's predictors), or None.
        collect: names of training signals the losses asked for (e.g. ``"attention"``).
        aux: what a training pass leaves for the losses, by name (see :mod:`tokenpatch.losses`).
        policy: (B, N - P) soft or hard keep mask over the original patches (1 = kept) for
            methods that mask tokens instead of removing them in training mode, or None.
        counts: (B,) real tokens per sample when samples keep different numbers of tokens and
            the batch is padded, or None.
        sizes: (B, N) original tokens each current token stands for, once a merging method
            (``tome``) merged some; None before.
        groups: (B, N - P at the start) for each original patch, the index among the current
            patches of the token that carries it; kept by merging methods while a trace is open.
    """

    num_prefix: int
    num_tokens: int
    depth: int
    positions: Tensor
    scores: Optional[Tensor] = None
    trace: Optional[Trace] = None
    modules: Optional[nn.Module] = None
    collect: frozenset[str] = frozenset()
    aux: dict[str, list] = field(default_factory=dict)
    policy: Optional[Tensor] = None
    counts: Optional[Tensor] = None
    sizes: Optional[Tensor] = None
    groups: Optional[Tensor] = None

    @classmethod
    def start(cls, x: Tensor, num_prefix: int, depth: int, trace: Optional[Trace], modules: Optional[nn.Module] = None,
              collect: frozenset[str] = frozenset()) -> "PassState":
        """State for a pass of a ``depth``-block model whose first block receives ``x`` of shape (B, N, C)."""
        b, n, _ = x.shape
        positions = torch.arange(n, device=x.device).expand(b, n)
        if trace is not None:
            trace.records.clear()
            trace.scores.clear()
            trace.input_tokens = n
        return cls(num_prefix=num_prefix, num_tokens=n, depth=depth, positions=positions, trace=trace, modules=modules, collect=collect)

    @property
    def initial_patches(self) -> int:
        """Patch tokens of the pass's first block (before any reduction)."""
        return self.num_tokens - self.num_prefix

    def add_aux(self, name: str, value: object) -> None:
        """Leave ``value`` under ``name`` for the training losses."""
        self.aux.setdefault(name, []).append(value)

    def record(self, block: int, attention_tokens: int, output_tokens: int, computed: Optional[Tensor] = None) -> None:
        """Log one block's work if a trace is open.

        Args:
            computed: (B, M) indices into the current tokens whose MLP ran; None means all.
        """
        if self.trace is not None:
            positions = self.positions if computed is None else self.positions.gather(1, computed)
            counts = None if self.counts is None else self.counts.detach()
            groups = None if self.groups is None else self.groups.detach()
            self.trace.records.append(BlockRecord(block, int(attention_tokens), int(positions.shape[1]), int(output_tokens),
                                                  positions.detach(), counts, groups))

    def record_scores(self, block: int, name: str, values: Tensor, real: Optional[Tensor] = None) -> None:
        """Log per-token scores of the current patch tokens if a trace is open.

        Args:
            values: (B, M) scores of the current patches (the tokens after the prefix).
            real: (B, M) bool, False for padding; None: all real.
        """
        if self.trace is not None:
            positions = self.positions[:, self.num_prefix:]
            if real is not None:
                positions = positions.masked_fill(~real, -1)
            self.trace.scores.append(ScoreRecord(block, name, positions.detach(), values.detach()))

    def real_tokens(self, n: int) -> Optional[Tensor]:
        """(B, n) bool, False for the padding of a padded batch of n tokens; None when unpadded."""
        return None if self.counts is None else torch.arange(n, device=self.counts.device) < self.counts.unsqueeze(1)

    def patch_counts(self, x: Tensor) -> Tensor:
        """(B,) real patches of each sample of the current (B, N, C) tokens ``x``, padding excluded."""
        if self.counts is None:
            return torch.full((x.shape[0],), x.shape[1] - self.num_prefix, device=x.device)
        return self.counts - self.num_prefix

    def select(self, index: Tensor) -> None:
        """Keep only the tokens at ``index`` (B, K) in the tracked positions (tokens were dropped)."""
        self.positions = torch.gather(self.positions, 1, index)


def attend(view: BlockView, q: Tensor, k: Tensor, v: Tensor, xn: Tensor, key_mask: Optional[Tensor] = None,
           key_bias: Optional[Tensor] = None) -> Tensor:
    """Multi-head attention on SDPA plus the output projection.

    Args:
        q: (B, H, Nq, D) queries; k, v: (B, H, Nk, D).
        xn: (B, Nq, C) normed query tokens (some blocks gate the output on them).
        key_mask: (B, Nk) bool, False for padding keys no query may attend to; None: all keys.
        key_bias: (B, Nk) float added to every query's logit for each key (ToMe's log-size
            bias); None: no bias. Passed to SDPA as an additive mask, so SDPA still runs.

    Returns:
        (B, Nq, C) attention-branch output, before the residual.
    """
    mask = None
    if key_bias is not None:
        mask = key_bias[:, None, None, :].to(q.dtype)
        if key_mask is not None:
            mask = mask.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    elif key_mask is not None:
        mask = key_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=view.attn_dropout, scale=view.scale)
    return view.attention_output(o, xn)


def attention_with_projections(view: BlockView, x: Tensor, key_mask: Optional[Tensor] = None,
                               key_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First half of a block on all tokens, ``x + attn(norm1(x))``, also returning q, k and v.

    Args:
        x: (B, N, C) tokens.
        key_mask, key_bias: see :func:`attend`.

    Returns:
        (B, N, C) tokens after the attention residual, and the (B, H, N, D) queries, keys and
        values it used (methods score tokens on them).
    """
    xn = view.norm1(x)
    q, k, v = view.qkv(xn)
    return view.add_attention(x, attend(view, q, k, v, xn, key_mask, key_bias)), q, k, v


def attention_residual(view: BlockView, x: Tensor, with_cls_attention: bool = False,
                       key_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """First half of a block on all tokens of ``x``: ``x + attn(norm1(x))``.

    Args:
        x: (B, N, C) tokens; the class token is at position 0.
        with_cls_attention: also return the class token's head-averaged attention.
        key_mask: (B, N) bool, False for padding tokens (see :func:`attend`).

    Returns:
        (B, N, C) tokens after the attention residual, and (B, N) class-token attention over
        all N tokens (or None; padding keys get 0).
    """
    x, q, k, _ = attention_with_projections(view, x, key_mask)
    scores = cls_attention(q[:, :, :1], k, view.scale, key_mask) if with_cls_attention else None
    return x, scores


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


def masked_block(view: BlockView, x: Tensor, key_keep: Tensor) -> Tensor:
    """A whole block on all tokens with attention restricted to kept keys (:func:`policy_softmax`).

    Materialises the (B, H, N, N) map, so it is for training-mode passes only.

    Args:
        x: (B, N, C) tokens.
        key_keep: (B, N) keep mask over all tokens.

    Returns:
        (B, N, C) tokens.
    """
    xn = view.norm1(x)
    q, k, v = view.qkv(xn)
    probs = policy_softmax((q * view.scale) @ k.transpose(-2, -1), key_keep)
    probs = F.dropout(probs, view.attn_dropout, training=view.attn_dropout > 0)
    return mlp_residual(view, view.add_attention(x, view.attention_output(probs @ v, xn)))


def mean_attention_logits(view: BlockView, xn: Tensor) -> Tensor:
    """(B, N, N) head-averaged attention logits of normed tokens ``xn`` (B, N, C), for training losses."""
    return ((view.query(xn) * view.scale) @ view.key(xn).transpose(-2, -1)).mean(dim=1)


def mlp_residual(view: BlockView, x: Tensor) -> Tensor:
    """Second half of a block: ``x + mlp(norm2(x))``, (B, N, C) -> (B, N, C)."""
    return view.mlp_residual(x)


def full_block(view: BlockView, x: Tensor) -> Tensor:
    """A whole block on all tokens, composed from the pieces; equals the block's own forward."""
    return mlp_residual(view, attention_residual(view, x)[0])


def padded_block(view: BlockView, x: Tensor, state: PassState) -> Tensor:
    """A whole block on a batch that may be padded: keys past ``state.counts[b]`` are masked out.

    With no padding (``state.counts`` None) this is :func:`full_block`. Padding tokens still
    compute, but no real token attends to them, so a sample's output is its output alone.
    """
    if state.counts is None:
        return full_block(view, x)
    return mlp_residual(view, attention_residual(view, x, key_mask=state.real_tokens(x.shape[1]))[0])


def refuse_export(method: str) -> None:
    """Raise a clear error when ``torch.export`` (also behind ONNX export) traces a pass whose
    token counts are computed from the image: a data-dependent shape it cannot express."""
    if torch.compiler.is_exporting():
        raise TokenPatchError(
            f"{method} keeps a per-image number of tokens (computed from the data), which cannot be exported "
            "with torch.export or ONNX; export idle, evit, tome, dynamicvit or sait without mass, whose counts are fixed"
        )


def keep_tokens(x: Tensor, state: PassState, keep_positions: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix tokens plus the patches at ``keep_positions``.

    Args:
        x: (B, N, C) tokens.
        keep_positions: (B, K) positions of patches to keep, counted from the first patch.

    Returns:
        (B, P + K, C) kept tokens and their (B, P + K) positions in ``x``.
    """
    prefix = prefix_positions(x.shape[0], state.num_prefix, x.device)
    index = torch.cat([prefix, keep_positions + state.num_prefix], dim=1)
    return gather_tokens(x, index), index
