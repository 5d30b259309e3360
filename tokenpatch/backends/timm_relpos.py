"""Backend for timm's ``VisionTransformerRelPos`` family (``vit_relpos_*``, ``vit_srelpos_*``).

Read against timm 1.0.31 ``timm.models.vision_transformer_relpos``: ``RelPosBlock`` (pre-norm,
``ls1``/``ls2`` layer scale, like timm's ``Block``) and ``ResPostRelPosBlock`` (``norm1``/``norm2``
applied to the branch outputs), with ``RelPosAttention`` (fused ``qkv``, ``q_norm``/``k_norm``,
``proj``) whose logits get a relative position bias: the block's own ``rel_pos.get_bias()``
((1, H, N, N): a table or a small MLP over log coordinates), or else the model's shared bias
handed to every block as ``shared_rel_pos=``. A reduced block takes the rows and columns of
the tokens it kept.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ..core.blocks import BlockView
from ..core.ops import pair_bias
from .timm import TimmBackend, TimmBlockView

try:
    from timm.models.vision_transformer_relpos import (RelPosAttention, RelPosBlock, ResPostRelPosBlock,
                                                       VisionTransformerRelPos)
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError("tokenpatch's timm backend needs timm>=1.0.20 (pip install timm)") from exc


class RelPosBlockView(TimmBlockView):
    """A ``RelPosBlock``/``ResPostRelPosBlock`` as composable pieces, relative position bias included."""

    uses_positions = True

    def __init__(self, block: nn.Module, shared_bias: Optional[Tensor]) -> None:
        super().__init__(block)
        self.shared_bias = shared_bias
        self.post_norm = isinstance(block, ResPostRelPosBlock)

    def norm1(self, x: Tensor) -> Tensor:
        return x if self.post_norm else self.block.norm1(x)

    def attention_bias(self, query_positions: Optional[Tensor], key_positions: Optional[Tensor]) -> Optional[Tensor]:
        # as RelPosAttention's fused path: the block's own bias, else the shared one
        bias = self.attn.rel_pos.get_bias() if self.attn.rel_pos is not None else self.shared_bias
        if bias is None or query_positions is None or key_positions is None:
            return bias
        # a token with no position (EViT's fused token) takes the first token's bias
        return pair_bias(bias, query_positions.clamp(min=0), key_positions.clamp(min=0))

    def add_attention(self, x: Tensor, y: Tensor) -> Tensor:
        if self.post_norm:
            return x + self.block.drop_path1(self.block.norm1(y))
        return super().add_attention(x, y)

    def mlp_residual(self, x: Tensor) -> Tensor:
        if self.post_norm:
            return x + self.block.drop_path2(self.block.norm2(self.block.mlp(x)))
        return super().mlp_residual(x)


class RelPosBackend(TimmBackend):
    """timm ``VisionTransformerRelPos`` models built from ``RelPosBlock``/``ResPostRelPosBlock``."""

    name = "timm-relpos"
    supported = "timm VisionTransformerRelPos models (vit_relpos_*, vit_srelpos_*) with RelPosBlock or ResPostRelPosBlock"

    block_types = (RelPosBlock, ResPostRelPosBlock)
    attention_types = (RelPosAttention,)

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformerRelPos)

    def view(self, block: nn.Module, extra: dict[str, Any]) -> BlockView:
        return RelPosBlockView(block, extra.get("shared_rel_pos"))

    def block_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x, *rest = args if args else (kwargs.pop("x"),)
        return x, {"shared_rel_pos": rest[0] if rest else kwargs.get("shared_rel_pos")}
