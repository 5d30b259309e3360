"""Backend for timm's ``Beit`` family: BEiT and BEiT v2.

Read against timm 1.0.31 ``timm.models.beit``: ``Block`` (``norm1``, ``attn``, ``gamma_1``,
``drop_path1``, ``norm2``, ``mlp``, ``gamma_2``, ``drop_path2``) with ``Attention`` (a fused
``qkv`` linear without bias plus ``q_bias``/``k_bias``/``v_bias``, ``proj``) whose logits get a
relative position bias: per block from ``relative_position_bias_table`` indexed by
``relative_position_index`` ((N, N) over the class token and the patches), and/or one shared
(1, H, N, N) bias the model hands every block as ``shared_rel_pos_bias=``. A reduced block takes
the rows and columns of the tokens it kept, so each pair keeps its own bias.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ..core.blocks import BlockView
from ..core.ops import pair_bias
from .timm import FusedQkvViews, TimmBackend

try:
    from timm.models.beit import Attention as BeitAttention
    from timm.models.beit import Beit
    from timm.models.beit import Block as BeitBlock
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError("tokenpatch's timm backend needs timm>=1.0.20 (pip install timm)") from exc


class BeitBlockView(FusedQkvViews, BlockView):
    """A BEiT ``Block`` as composable pieces, relative position bias included."""

    uses_positions = True

    def __init__(self, block: nn.Module, shared_bias: Optional[Tensor]) -> None:
        self.block, self.attn, self.shared_bias = block, block.attn, shared_bias
        self.num_heads = self.attn.num_heads
        self.head_dim = self.attn.qkv.weight.shape[0] // (3 * self.num_heads)
        self.scale = self.attn.scale

    @property
    def attn_dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0

    def norm1(self, x: Tensor) -> Tensor:
        return self.block.norm1(x)

    def _project(self, xn: Tensor, part: int) -> Tensor:
        out = self.fused_qkv.part(xn, part)
        b, n, _ = out.shape
        return out.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    # Position enters through the bias, not the projections.
    def qkv(self, xn: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        return self._project(xn, 0), self._project(xn, 1), self._project(xn, 2)

    def query(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._project(xn, 0)

    def key(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._project(xn, 1)

    def value(self, xn: Tensor) -> Tensor:
        return self._project(xn, 2)

    def attention_bias(self, query_positions: Optional[Tensor], key_positions: Optional[Tensor]) -> Optional[Tensor]:
        bias = self.attn._get_rel_pos_bias() if self.attn.relative_position_bias_table is not None else None
        if self.shared_bias is not None:  # the model's (H, N, N) bias
            bias = self.shared_bias.unsqueeze(0) if bias is None else bias + self.shared_bias
        if bias is None or query_positions is None or key_positions is None:
            return bias
        # a token with no position (EViT's fused token) takes the class token's bias, which in
        # BEiT is one learned value per direction, the same for every patch
        return pair_bias(bias, query_positions.clamp(min=0), key_positions.clamp(min=0))

    def attention_output(self, o: Tensor, xn: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        return self.attn.proj_drop(self.attn.proj(o.transpose(1, 2).reshape(b, n, -1)))

    def add_attention(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.block.drop_path1(y if self.block.gamma_1 is None else self.block.gamma_1 * y)

    def mlp_residual(self, x: Tensor) -> Tensor:
        y = self.block.mlp(self.block.norm2(x))
        return x + self.block.drop_path2(y if self.block.gamma_2 is None else self.block.gamma_2 * y)


class BeitBackend(TimmBackend):
    """timm ``Beit`` models (BEiT, BEiT v2) built from BEiT's ``Block`` and ``Attention``."""

    name = "timm-beit"
    supported = "timm Beit models (beit_*, beitv2_*) with BEiT's Block and Attention"

    block_types = (BeitBlock,)
    attention_types = (BeitAttention,)

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, Beit)

    def view(self, block: nn.Module, extra: dict[str, Any]) -> BlockView:
        return BeitBlockView(block, extra.get("shared_rel_pos_bias"))

    def block_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x, *rest = args if args else (kwargs.pop("x"),)
        return x, {"shared_rel_pos_bias": rest[0] if rest else kwargs.get("shared_rel_pos_bias")}
