"""Backend for timm's ``VisionTransformer`` family (ViT, DeiT, DeiT-III, distilled DeiT, registers, SigLIP, ``*_gap_*``).

Read against timm 1.0.31: ``timm.models.vision_transformer.Block`` (``norm1``, ``attn``, ``ls1``,
``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``) and ``timm.layers.Attention``
(fused ``qkv`` linear, ``q_norm``/``k_norm``, optional ``norm`` and ``gate``, ``proj``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.blocks import Backend, BlockView
from ..errors import InputShapeError, TokenPatchError, UnsupportedModelError

try:  # timm is a hard dependency, but keep the import error readable.
    from timm.data import resolve_data_config
    from timm.layers import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer
except ImportError as exc:  # pragma: no cover - exercised only without timm
    raise ImportError("tokenpatch's timm backend needs timm>=1.0.20 (pip install timm)") from exc


def refuse_masks(attn_mask: Optional[Tensor], is_causal: bool) -> None:
    """Raise a clear error for the attention-mask arguments of a timm block call."""
    if attn_mask is not None or is_causal:
        raise TokenPatchError(
            "a patched timm block does not support attn_mask or is_causal: token reduction "
            "changes the sequence length the mask was built for; unpatch the model to use masks"
        )


class FusedQkv:
    """The query, key and value parts of a timm attention's fused ``qkv`` linear.

    The weight is ``qkv.weight``; the bias is ``qkv.bias`` or, where timm splits it into
    ``q_bias``/``k_bias``/``v_bias`` (BEiT, EVA), their concatenation. Both are looked up once
    per block call (a view's lifetime), not once per projection: a reducing block projects up to
    four times, and at batch 1 the module look-ups are a visible part of its bookkeeping.
    """

    def __init__(self, attn: nn.Module) -> None:
        self.weight = attn.qkv.weight
        if getattr(attn, "q_bias", None) is not None:
            self.bias: Optional[Tensor] = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        else:
            self.bias = attn.qkv.bias
        self.width = self.weight.shape[0] // 3

    def part(self, xn: Tensor, part: int) -> Tensor:
        """Queries (0), keys (1) or values (2) of (B, N, C) ``xn``: rows ``[part * W, (part + 1) * W)``
        of the weight and bias. Returns (B, N, W)."""
        rows = slice(part * self.width, (part + 1) * self.width)
        return F.linear(xn, self.weight[rows], None if self.bias is None else self.bias[rows])


class FusedQkvViews:
    """Mixin of the views of timm blocks whose attention has a fused ``qkv`` in ``self.attn``."""

    attn: nn.Module
    _fused_qkv: Optional[FusedQkv] = None

    @property
    def fused_qkv(self) -> FusedQkv:
        """The attention's :class:`FusedQkv`, resolved on first use (not ``functools.cached_property``,
        whose lock ``torch.compile`` cannot trace on Python 3.11)."""
        if self._fused_qkv is None:
            self._fused_qkv = FusedQkv(self.attn)
        return self._fused_qkv


def unless_identity(module: nn.Module) -> Optional[nn.Module]:
    """``module``, or None where it is an ``nn.Identity`` whose call can be skipped."""
    return None if isinstance(module, nn.Identity) else module


class TimmBlockView(FusedQkvViews, BlockView):
    """A timm ``Block`` with a standard ``Attention`` as composable pieces."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.attn = block.attn
        self.num_heads = self.attn.num_heads
        self.head_dim = self.attn.head_dim
        self.scale = self.attn.scale
        self.q_norm, self.k_norm = unless_identity(self.attn.q_norm), unless_identity(self.attn.k_norm)

    @property
    def attn_dropout(self) -> float:
        return self.attn.attn_drop.p if self.attn.training else 0.0

    def norm1(self, x: Tensor) -> Tensor:
        return self.block.norm1(x)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _project(self, xn: Tensor, part: int) -> Tensor:
        return self._heads(self.fused_qkv.part(xn, part))

    @staticmethod
    def _normed(norm: Optional[nn.Module], t: Tensor) -> Tensor:
        """``norm(t)``, or ``t`` where the norm is an identity (``unless_identity``)."""
        return t if norm is None else norm(t)

    # Absolute position embeddings: the projections do not depend on where a token sits.
    def qkv(self, xn: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = xn.shape
        qkv = self.attn.qkv(xn).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self._normed(self.q_norm, q), self._normed(self.k_norm, k), v

    def query(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._normed(self.q_norm, self._project(xn, 0))

    def key(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._normed(self.k_norm, self._project(xn, 1))

    def value(self, xn: Tensor) -> Tensor:
        return self._project(xn, 2)

    def attention_output(self, o: Tensor, xn: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        y = o.transpose(1, 2).reshape(b, n, -1)
        if hasattr(self.attn, "norm"):  # timm Attention's optional scale norm
            y = self.attn.norm(y)
        if getattr(self.attn, "gate", None) is not None:
            y = y * self.attn.gate(xn).sigmoid()
        return self.attn.proj_drop(self.attn.proj(y))

    def add_attention(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.block.drop_path1(self.block.ls1(y))

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.block.drop_path2(self.block.ls2(self.block.mlp(self.block.norm2(x))))


class TimmBackend(Backend):
    """timm ``VisionTransformer`` and subclasses built from standard ``Block``/``Attention``."""

    name = "timm"
    supported = (
        "timm VisionTransformer models (vit_*, deit_*, deit3_*, *_distilled_*, *_reg*) whose blocks "
        "are timm.models.vision_transformer.Block with timm.layers.Attention"
    )

    #: the block and attention classes whose pieces the view knows (exactly these, not subclasses)
    block_types: tuple[type, ...] = (TimmBlock,)
    attention_types: tuple[type, ...] = (TimmAttention,)

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def check(self, model: nn.Module) -> None:
        name = type(model).__name__
        for i, block in enumerate(model.blocks):
            if type(block) not in self.block_types or type(getattr(block, "attn", None)) not in self.attention_types:
                raise UnsupportedModelError(
                    f"{name}.blocks[{i}] is {type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__}; supported: {self.supported}."
                )

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(model, "cls_token", None) is not None

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.embed_dim)

    def pools_class_token(self, model: nn.Module) -> bool:
        return model.global_pool == "token"

    def head(self, model: nn.Module) -> nn.Module:
        return model.head

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.norm  # an Identity where the model norms after pooling (fc_norm)

    def view(self, block: nn.Module, extra: dict[str, Any]) -> BlockView:
        return TimmBlockView(block)

    def block_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x, *rest = args if args else (kwargs.pop("x"),)
        refuse_masks(rest[0] if rest else kwargs.get("attn_mask"),
                     rest[1] if len(rest) > 1 else kwargs.get("is_causal", False))
        return x, {}

    def image_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        return args[0] if args else kwargs["x"]

    def check_input(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().check_input(model, args, kwargs)
        _check_fits_patch_embedding(model, self.image_input(args, kwargs))

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        return tuple(model.patch_embed.img_size)

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        # the pretrained config's size is not the model's when it was built with another img_size
        return {**resolve_data_config(model=model), "input_size": (3, *self.input_size(model))}

    def returned_blocks(self, model: nn.Module, kwargs: dict[str, Any]) -> str:
        # global_pool='' without an attention pool: forward returns (per-token outputs of) every token
        return "last" if model.global_pool == "" and getattr(model, "attn_pool", None) is None else "head"

    def all_block_outputs(self, model: nn.Module) -> tuple[str, ...]:
        return ("forward_intermediates",)  # get_intermediate_layers calls it

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return bool(getattr(model, "grad_checkpointing", False))  # timm checkpoints in eval mode too

    def disable_checkpointing_hint(self) -> str:
        return "turn it off with model.set_grad_checkpointing(False)"


def _check_fits_patch_embedding(model: nn.Module, images: Tensor) -> None:
    """An :class:`InputShapeError` for (B, C, H, W) ``images`` the model's convolutional patch
    embedding would refuse deep inside torch or timm: another channel count, another size where
    the model's is fixed, another floating dtype than its weights' outside autocast."""
    embed = getattr(model, "patch_embed", None)
    conv = getattr(embed, "proj", None)
    if not isinstance(conv, nn.Conv2d):
        return
    if images.shape[1] != conv.in_channels:
        raise InputShapeError(f"expected images with {conv.in_channels} channels, got {images.shape[1]} "
                              f"(shape {tuple(images.shape)})")
    size = tuple(embed.img_size) if embed.img_size is not None else None
    if getattr(embed, "strict_img_size", False) and size is not None and tuple(images.shape[-2:]) != size:
        raise InputShapeError(f"this model takes {size[0]}x{size[1]} images, got {images.shape[-2]}x{images.shape[-1]} "
                              "(timm builds it for another size with img_size=, or for any with dynamic_img_size=True)")
    device = images.device.type
    cast = (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
            and images.dtype != torch.float64)  # autocast casts the other floating types
    if images.dtype != conv.weight.dtype and not cast:
        raise InputShapeError(f"images are {images.dtype} but the model's weights {conv.weight.dtype}: convert them "
                              "(images.to(dtype))")
