"""Backend for timm's ``Eva`` family: EVA-02, EVA/EVA-CLIP, DINOv3, ``vit_*_rope*``, Perception Encoder.

Read against timm 1.0.31 ``timm.models.eva``: ``EvaBlock`` (``norm1``, ``attn``, ``gamma_1``,
``drop_path1``, ``norm2``, ``mlp``, ``gamma_2``, ``drop_path2``) and ``EvaBlockPostNorm`` (no
layer scale; ``norm1``/``norm2`` applied to the branch outputs), with ``EvaAttention`` or
``timm.layers.AttentionRope``: a fused ``qkv`` linear (its bias in ``qkv.bias`` or split into
``q_bias``/``k_bias``/``v_bias``) or ``q_proj``/``k_proj``/``v_proj`` (grouped key/value heads in
``AttentionRope``), ``q_norm``/``k_norm``, rotary embeddings on the patch tokens only,
``norm`` (scale norm), optional ``gate``, ``proj``. The model hands every block its rotary
table as ``rope=`` ((N, 2D); one (H, N, 2D) table per block in the mixed mode): a reduced
block gathers the rows of the tokens it kept, so each token keeps its own rotation. MLPs
(``Mlp``, ``SwiGLU``, ``GluMlp``) are called as they are.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..core.blocks import BlockView
from ..core.ops import rotary_rows
from .timm import FusedQkvViews, TimmBackend, refuse_masks

try:
    from timm.layers import AttentionRope
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError("tokenpatch's timm backend needs timm>=1.0.20 (pip install timm)") from exc


class EvaBlockView(FusedQkvViews, BlockView):
    """An ``EvaBlock``/``EvaBlockPostNorm`` as composable pieces, rotary table included."""

    uses_positions = True

    def __init__(self, block: nn.Module, rope: Optional[Tensor]) -> None:
        self.block, self.attn, self.rope = block, block.attn, rope
        self.num_heads = self.attn.num_heads
        self.head_dim = self.attn.head_dim
        self.scale = self.attn.scale
        self.kv_groups = getattr(self.attn, "num_kv_groups", 1)
        self.post_norm = isinstance(block, EvaBlockPostNorm)

    @property
    def attn_dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0

    def norm1(self, x: Tensor) -> Tensor:
        return x if self.post_norm else self.block.norm1(x)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    def _project(self, xn: Tensor, part: int) -> Tensor:
        """Queries (0), keys (1) or values (2), (B, N, C) -> (B, heads, N, D), before norms and rotation."""
        if self.attn.qkv is None:
            return self._heads((self.attn.q_proj, self.attn.k_proj, self.attn.v_proj)[part](xn))
        return self._heads(self.fused_qkv.part(xn, part))

    def _rotate(self, t: Tensor, positions: Optional[Tensor]) -> Tensor:
        if self.rope is None:
            return t
        if positions is None:
            positions = torch.arange(t.shape[2], device=t.device).expand(t.shape[0], -1)
        rows = rotary_rows(self.rope, positions, self.attn.num_prefix_tokens)
        return apply_rot_embed_cat(t, rows, half=getattr(self.attn, "rotate_half", False)).type_as(t)

    def _shared_heads(self, t: Tensor) -> Tensor:
        """Grouped key/value heads repeated to one per query head (after norm and rotation, as timm does)."""
        return t if self.kv_groups == 1 else t.repeat_interleave(self.kv_groups, dim=1)

    def qkv(self, xn: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.query(xn, positions), self.key(xn, positions), self.value(xn)

    def query(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._rotate(self.attn.q_norm(self._project(xn, 0)), positions)

    def key(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._shared_heads(self._rotate(self.attn.k_norm(self._project(xn, 1)), positions))

    def value(self, xn: Tensor) -> Tensor:
        return self._shared_heads(self._project(xn, 2))

    def attention_output(self, o: Tensor, xn: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        y = self.attn.norm(o.transpose(1, 2).reshape(b, n, -1))
        if self.attn.gate is not None:
            y = y * self.attn.gate(xn).sigmoid()
        return self.attn.proj_drop(self.attn.proj(y))

    def add_attention(self, x: Tensor, y: Tensor) -> Tensor:
        if self.post_norm:
            y = self.block.norm1(y)
        elif self.block.gamma_1 is not None:
            y = self.block.gamma_1 * y
        return x + self.block.drop_path1(y)

    def mlp_residual(self, x: Tensor) -> Tensor:
        block = self.block
        if self.post_norm:
            return x + block.drop_path2(block.norm2(block.mlp(x)))
        y = block.mlp(block.norm2(x))
        return x + block.drop_path2(y if block.gamma_2 is None else block.gamma_2 * y)


class EvaBackend(TimmBackend):
    """timm ``Eva`` models whose blocks are ``EvaBlock``/``EvaBlockPostNorm`` with ``EvaAttention``/``AttentionRope``."""

    name = "timm-eva"
    supported = ("timm Eva models (eva02_*, eva_*, vit_*_dinov3, vit_*_rope*, vit_pe_*) with EvaBlock or "
                 "EvaBlockPostNorm blocks and EvaAttention or AttentionRope attention")

    block_types = (EvaBlock, EvaBlockPostNorm)
    attention_types = (EvaAttention, AttentionRope)

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, Eva)

    def view(self, block: nn.Module, extra: dict[str, Any]) -> BlockView:
        return EvaBlockView(block, extra.get("rope"))

    def block_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x, *rest = args if args else (kwargs.pop("x"),)
        rope = rest[0] if rest else kwargs.get("rope")
        refuse_masks(rest[1] if len(rest) > 1 else kwargs.get("attn_mask"),
                     rest[2] if len(rest) > 2 else kwargs.get("is_causal", False))
        return x, {"rope": rope}
