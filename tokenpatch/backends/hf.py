"""Backend for Hugging Face transformers vision encoders (the 5.x layout): ViT, DeiT, CLIP, SigLIP,
DINOv2 (with registers), DINOv3, BEiT, Data2Vec-Vision, I-JEPA, ViT-MAE, ViT-MSN.

Read against transformers 5.23. Every supported layer is a pre-norm block whose attention has
query, key and value projections and an output projection; the families differ only in names,
recorded as one :class:`Layout` each: ViT-style layers (``layernorm_before``, ``attention``
with ``o_proj``/``scaling``/``attention_dropout``, ``layernorm_after``, ``mlp``, ``dropout`` on
both residual branches), CLIP/SigLIP encoder layers (``layer_norm1``, ``self_attn`` with
``out_proj``/``scale``/``dropout``, ``layer_norm2``, ``mlp``) and DINOv2 layers (``norm1``,
``attention``, ``layer_scale1``, ``drop_path``, ``norm2``, ``mlp``, ``layer_scale2``; DINOv3's
with rotary tables), BEiT layers (ViT names, ``lambda_1``/``lambda_2``, a relative position bias)
and Data2Vec-Vision layers (``attention.attention.query/key/value``, ``attention.output.dense``,
``intermediate`` then ``output``, returning tuples). A model's
layers are the ModuleList of its vision tower (``vision_model`` where there is one, so a
``CLIPModel``'s text layers are never touched); its prefix is read from its embeddings (class
token or ``class_embedding``, distillation token, register tokens).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.blocks import Backend, BlockView
from ..core.ops import pair_bias, rotary_rows
from ..errors import InputShapeError, InvalidOptionError, TokenPatchError, UnsupportedModelError


@dataclass(frozen=True)
class Layout:
    """Where one transformers layer family keeps its pieces (dotted paths from the layer; the
    projections, scale and attention dropout are read on the ``attention`` module)."""

    norm1: str
    norm2: str
    attention: str  # the module with the query, key and value projections
    output: str = "attention.o_proj"
    projections: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")
    mlp: tuple[str, ...] = ("mlp",)  # applied in turn
    scale: Optional[str] = "scaling"  # None: head_dim ** -0.5
    attention_dropout: str = "attention_dropout"  # a float, or a Dropout module
    output_dropout: Optional[str] = None  # after the output projection, on the attention branch only
    residual_dropout: Optional[str] = None  # one module applied to both residual branches
    layer_scales: Optional[tuple[str, str]] = None
    drop_path: Optional[str] = None
    rotary: bool = False  # the layer takes position_embeddings=(cos, sin) for the patch tokens
    returns_tuple: bool = False  # the layer returns (hidden_states, ...)

    def modules(self) -> list[str]:
        """The dotted names of the modules a layer must have."""
        projections = [f"{self.attention}.{name}" for name in self.projections]
        return [self.norm1, self.attention, *projections, self.output, self.norm2, *self.mlp]


VIT = Layout("layernorm_before", "layernorm_after", "attention", residual_dropout="dropout")
CLIP = Layout("layer_norm1", "layer_norm2", "self_attn", output="self_attn.out_proj", scale="scale",
              attention_dropout="dropout")
DATA2VEC = Layout("layernorm_before", "layernorm_after", "attention.attention", output="attention.output.dense",
                  projections=("query", "key", "value"), mlp=("intermediate", "output"), scale=None,
                  attention_dropout="dropout", output_dropout="attention.output.dropout",
                  layer_scales=("lambda_1", "lambda_2"), drop_path="drop_path", returns_tuple=True)
DINOV2 = Layout("norm1", "norm2", "attention", layer_scales=("layer_scale1", "layer_scale2"), drop_path="drop_path")
BEIT = Layout("layernorm_before", "layernorm_after", "attention", residual_dropout="dropout",
              layer_scales=("lambda_1", "lambda_2"), drop_path="drop_path")
DINOV3 = Layout("norm1", "norm2", "attention", attention_dropout="dropout", layer_scales=("layer_scale1", "layer_scale2"),
                drop_path="drop_path", rotary=True)

# (transformers module, layer class, its layout, supported model classes, those whose output pools patch tokens)
FAMILIES = (
    ("vit", "ViTLayer", VIT, ("ViTModel", "ViTForImageClassification"), ()),
    ("deit", "DeiTLayer", VIT, ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"), ()),
    ("clip", "CLIPEncoderLayer", CLIP, ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel"), ()),
    ("siglip", "SiglipEncoderLayer", CLIP, ("SiglipVisionModel", "SiglipForImageClassification"),
     ("SiglipVisionModel", "SiglipForImageClassification")),
    ("dinov2", "Dinov2Layer", DINOV2, ("Dinov2Model", "Dinov2ForImageClassification"), ("Dinov2ForImageClassification",)),
    ("dinov2_with_registers", "Dinov2WithRegistersLayer", DINOV2,
     ("Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"),
     ("Dinov2WithRegistersForImageClassification",)),
    ("siglip2", "Siglip2EncoderLayer", CLIP, ("Siglip2VisionModel", "Siglip2ForImageClassification"),
     ("Siglip2VisionModel", "Siglip2ForImageClassification")),
    ("dinov3_vit", "DINOv3ViTLayer", DINOV3, ("DINOv3ViTModel",), ()),
    ("beit", "BeitLayer", BEIT, ("BeitModel", "BeitForImageClassification"), ("BeitForImageClassification",)),
    ("data2vec", "Data2VecVisionLayer", DATA2VEC, ("Data2VecVisionModel", "Data2VecVisionForImageClassification"),
     ("Data2VecVisionForImageClassification",)),
    ("ijepa", "IJepaLayer", VIT, ("IJepaModel", "IJepaForImageClassification"), ("IJepaForImageClassification",)),
    ("vit_mae", "ViTMAELayer", VIT, ("ViTMAEModel",), ()),
    ("vit_msn", "ViTMSNLayer", VIT, ("ViTMSNModel", "ViTMSNForImageClassification"), ()),
)


_VISION_SUFFIX = {"data2vec": "_vision"}  # data2vec keeps its vision model in modeling_data2vec_vision
#: families whose models take patch sequences (B, N, C * p * p) with a padding mask, not images
PATCH_INPUTS = frozenset({"siglip2"})


@dataclass(frozen=True)
class Family:
    """A supported model class: its layer class and layout, whether its output pools patch tokens,
    and whether it takes patch sequences with a padding mask (SigLIP 2) instead of images."""

    layer: type
    layout: Layout
    pools_patches: bool
    patch_inputs: bool = False


@lru_cache(maxsize=1)
def supported_models() -> dict[type, Family]:
    """Supported transformers model classes (empty when transformers is absent)."""
    try:
        import transformers.models as models
    except ImportError:
        return {}
    table = {}
    for module, layer, layout, classes, pooling in FAMILIES:
        source = importlib.import_module(f"{models.__name__}.{module}.modeling_{module}{_VISION_SUFFIX.get(module, '')}")
        for name in classes:
            table[getattr(source, name)] = Family(getattr(source, layer), layout, name in pooling, module in PATCH_INPUTS)
    return table


class HFBlockView(BlockView):
    """A transformers layer, described by its :class:`Layout`, as composable pieces (DINOv3's
    rotary cos/sin tables included: a token takes the rows of its own position)."""

    def __init__(self, layer: nn.Module, layout: Layout, rotary: Optional[tuple[Tensor, Tensor]] = None,
                 num_prefix: int = 0, bias: Optional[Tensor] = None) -> None:
        self.layer, self.layout, self.bias = layer, layout, bias
        self.uses_positions = rotary is not None or bias is not None
        # one (N - P, 2D) table of sin and cos rows, as the rotary helpers take it
        self.rotary = None if rotary is None else torch.cat([rotary[1], rotary[0]], dim=-1)
        self.num_prefix = num_prefix
        self.attn = layer.get_submodule(layout.attention)
        self.q_proj, self.k_proj, self.v_proj = (getattr(self.attn, name) for name in layout.projections)
        self.head_dim = getattr(self.attn, "head_dim", None) or self.attn.attention_head_size
        self.num_heads = self.q_proj.out_features // self.head_dim
        self.scale = self.head_dim**-0.5 if layout.scale is None else getattr(self.attn, layout.scale)

    @property
    def attn_dropout(self) -> float:
        dropout = getattr(self.attn, self.layout.attention_dropout)
        probability = dropout.p if isinstance(dropout, nn.Dropout) else dropout
        return probability if self.attn.training else 0.0

    def norm1(self, x: Tensor) -> Tensor:
        return getattr(self.layer, self.layout.norm1)(x)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    def _rotate(self, t: Tensor, positions: Optional[Tensor]) -> Tensor:
        """Queries or keys rotated by their tokens' rows (no rotation for prefix tokens); as is without a table."""
        if self.rotary is None:
            return t
        if positions is None:
            positions = torch.arange(t.shape[2], device=t.device).expand(t.shape[0], -1)
        sin, cos = rotary_rows(self.rotary, positions, self.num_prefix).to(t.dtype).chunk(2, dim=-1)
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    def qkv(self, xn: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.query(xn, positions), self.key(xn, positions), self.value(xn)

    def query(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._rotate(self._heads(self.q_proj(xn)), positions)

    def key(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._rotate(self._heads(self.k_proj(xn)), positions)

    def value(self, xn: Tensor) -> Tensor:
        return self._heads(self.v_proj(xn))

    def attention_bias(self, query_positions: Optional[Tensor], key_positions: Optional[Tensor]) -> Optional[Tensor]:
        if self.bias is None or query_positions is None or key_positions is None:
            return self.bias
        # a token with no position (EViT's fused token) takes the first token's bias
        return pair_bias(self.bias, query_positions.clamp(min=0), key_positions.clamp(min=0))

    def attention_output(self, o: Tensor, xn: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        y = self.layer.get_submodule(self.layout.output)(o.transpose(1, 2).reshape(b, n, -1))
        return y if self.layout.output_dropout is None else self.layer.get_submodule(self.layout.output_dropout)(y)

    def _branch(self, y: Tensor, which: int) -> Tensor:
        """A residual branch's output after its layer scale, drop path and dropout."""
        layout = self.layout
        if layout.layer_scales is not None:  # a module (DINOv2), or a parameter, 1.0 or None (BEiT's lambdas)
            scale = getattr(self.layer, layout.layer_scales[which])
            if scale is not None:
                y = scale(y) if isinstance(scale, nn.Module) else scale * y
        for name in (layout.drop_path, layout.residual_dropout):
            if name is not None:
                y = getattr(self.layer, name)(y)
        return y

    def add_attention(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self._branch(y, 0)

    def mlp_residual(self, x: Tensor) -> Tensor:
        y = getattr(self.layer, self.layout.norm2)(x)
        for name in self.layout.mlp:
            y = self.layer.get_submodule(name)(y)
        return x + self._branch(y, 1)


@lru_cache(maxsize=1)
def _layer_layouts() -> dict[type, Layout]:
    """Supported layer class -> its :class:`Layout` (looked up on every block call)."""
    return {family.layer: family.layout for family in supported_models().values()}


def _layout(layer: nn.Module) -> Layout:
    """The :class:`Layout` of a supported layer (or of a subclass, remembered on first use)."""
    layouts = _layer_layouts()
    kind = type(layer)
    if kind not in layouts:
        layouts[kind] = next(layout for layer_class, layout in list(layouts.items()) if issubclass(kind, layer_class))
    return layouts[kind]


def _vision_tower(model: nn.Module) -> nn.Module:
    """The vision part of a model: ``vision_model`` (repeatedly: SigLIP nests it twice), else the model."""
    while isinstance(getattr(model, "vision_model", None), nn.Module):
        model = model.vision_model
    return model


def _layers(model: nn.Module, layer_class: type) -> Optional[nn.ModuleList]:
    """The ModuleList of ``layer_class`` layers in the model's vision tower, or None."""
    for module in _vision_tower(model).modules():
        if isinstance(module, nn.ModuleList) and len(module) and isinstance(module[0], layer_class):
            return module
    return None


def _embeddings(model: nn.Module) -> nn.Module:
    """The vision embeddings (the module with the patch embedding)."""
    return next(m for m in _vision_tower(model).modules()
                if hasattr(m, "patch_embeddings") or hasattr(m, "patch_embedding"))


def _attention_bias(layer: nn.Module, attention: nn.Module, extra: dict[str, Any]) -> Optional[Tensor]:
    """The additive (1 or B, H, N, N) bias a layer call adds to its logits: its own relative
    position bias (BEiT's on the layer, Data2Vec's on the attention; built for the call's
    resolution) plus the one it was handed (a shared bias: ``attention_mask`` in BEiT,
    ``relative_position_bias`` in Data2Vec)."""
    bias = extra.get("attention_mask", extra.get("relative_position_bias"))
    owner = layer if hasattr(layer, "relative_position_bias") else attention
    relative = getattr(owner, "relative_position_bias", None)
    if isinstance(relative, nn.Module) and "resolution" in extra:
        height, width = extra["resolution"]
        patch = getattr(layer, "patch_size", None) or attention.config.patch_size
        window = (height // patch, width // patch)
        own = relative(window, extra.get("interpolate_pos_encoding", False), dim_size=1 + window[0] * window[1])
        bias = own if bias is None else own + bias
    if bias is None:
        return None
    if bias.dtype == torch.bool:  # True: may attend (SigLIP 2's padding mask); as an additive bias
        dtype = next(attention.parameters()).dtype
        bias = torch.zeros(bias.shape, dtype=dtype, device=bias.device).masked_fill(~bias, torch.finfo(dtype).min)
    return bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))


def _vision_config(model: nn.Module) -> Any:
    return getattr(model.config, "vision_config", model.config)


class HFBackend(Backend):
    """transformers vision encoders in :data:`FAMILIES` (base, task and CLIP models)."""

    name = "hf"
    supported = (
        "transformers (5.x) ViT, DeiT, CLIP (CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel's vision tower), "
        "SigLIP, DINOv2 (with registers), DINOv3, BEiT, Data2Vec-Vision, I-JEPA, ViT-MAE and ViT-MSN models and their "
        "image classifiers"
    )

    def claims(self, model: nn.Module) -> bool:
        return type(model) in supported_models()

    def check(self, model: nn.Module) -> None:
        family = supported_models()[type(model)]
        layers = _layers(model, family.layer)
        if layers is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no ModuleList of {family.layer.__name__}; "
                                        f"expected the transformers 5.x layout: {self.supported}")
        for i, layer in enumerate(layers):
            names = dict(layer.named_modules())
            missing = [m for m in family.layout.modules() if m not in names]
            if not isinstance(layer, family.layer) or missing:
                raise UnsupportedModelError(
                    f"{type(model).__name__}.layers[{i}] ({type(layer).__name__}) lacks {missing or 'a supported class'}; "
                    f"expected a {family.layer.__name__} with modules {family.layout.modules()}")

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(_layers(model, supported_models()[type(model)].layer))

    def num_prefix_tokens(self, model: nn.Module) -> int:
        embeddings = _embeddings(model)
        registers = getattr(embeddings, "register_tokens", None)
        return (int(self.has_class_token(model)) + int(getattr(embeddings, "distillation_token", None) is not None)
                + (0 if registers is None else int(registers.shape[1])))

    def has_class_token(self, model: nn.Module) -> bool:
        embeddings = _embeddings(model)
        return any(getattr(embeddings, name, None) is not None for name in ("cls_token", "class_embedding"))

    def embed_dim(self, model: nn.Module) -> int:
        return int(_vision_config(model).hidden_size)

    def pools_class_token(self, model: nn.Module) -> bool:
        # the others read the class (and distillation) token, or return every token unpooled;
        # a BeitModel's pooler averages the patches when its config says so
        return not (supported_models()[type(model)].pools_patches
                    or getattr(_vision_config(model), "use_mean_pooling", False) and getattr(model, "pooler", None) is not None)

    def head(self, model: nn.Module) -> nn.Module:
        for name in ("classifier", "cls_classifier"):  # DeiT with teacher: the class-token head
            if isinstance(getattr(model, name, None), nn.Module):
                return getattr(model, name)
        raise TokenPatchError(
            f"{type(model).__name__} has no classification head (classifier); use a *ForImageClassification model"
        )

    def view(self, block: nn.Module, extra: dict[str, Any]) -> BlockView:
        layout = _layout(block)
        rotary = extra.get("position_embeddings")
        # DINOv3 rotates the patches only, after its class and register tokens
        prefix = 1 + block.attention.config.num_register_tokens if layout.rotary else 0
        return HFBlockView(block, layout, rotary, prefix, _attention_bias(block, block.get_submodule(layout.attention), extra))

    def block_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x = args[0] if args else kwargs["hidden_states"]
        attention_mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.ndim not in (3, 4):
            raise TokenPatchError(
                "a patched transformers model supports attention masks over the whole sequence, (B, 1, N, N) or "
                f"(B, N, N) (additive or boolean), whose rows and columns it takes for the kept tokens; got shape "
                f"{tuple(attention_mask.shape)}; unpatch the model to use this mask"
            )
        if kwargs.get("output_attentions"):
            raise TokenPatchError(
                "output_attentions is not supported on a patched model: reduced blocks compute attention on "
                "subsets of tokens, so there is no full attention map to return; use tokenpatch.trace(model) to "
                "see which tokens each block computed"
            )
        # handed on as the call gave them: CLIP/SigLIP layers require attention_mask; DINOv3's take
        # its rotary (cos, sin), BEiT's and Data2Vec's the image resolution their relative position
        # bias is built for, Data2Vec's the shared bias
        extra: dict[str, Any] = {} if len(args) < 2 and "attention_mask" not in kwargs else {"attention_mask": attention_mask}
        for name in ("position_embeddings", "resolution", "interpolate_pos_encoding", "relative_position_bias"):
            if name in kwargs:
                extra[name] = kwargs[name]
        return x, extra

    def run_original(self, forward: Any, x: Tensor, extra: dict[str, Any]) -> Tensor:
        out = forward(x, **extra)
        return out[0] if isinstance(out, tuple) else out  # Data2Vec layers return (hidden_states,)

    def block_output(self, block: nn.Module, x: Tensor) -> Any:
        return (x,) if _layout(block).returns_tuple else x

    def image_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        if "pixel_values" in kwargs:
            return kwargs["pixel_values"]
        # CLIPModel takes input_ids first: the images are the first 4-D tensor
        images = [a for a in args if isinstance(a, Tensor) and a.ndim == 4]
        return images[0] if images else (args[0] if args else None)

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        config = _vision_config(model)
        if supported_models()[type(model)].patch_inputs:  # the square image its num_patches stand for
            side = math.isqrt(config.num_patches) * config.patch_size
            return side, side
        size = config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def data_config(self, model: nn.Module) -> dict[str, Any]:
        # The preprocessing of a transformers checkpoint lives in its image processor's file, not
        # in the model or its config; guessing it (the processor class defaults) would be wrong
        # for real checkpoints, so say where to get it.
        raise TokenPatchError(
            f"{type(model).__name__} does not carry its input preprocessing (a transformers checkpoint keeps it in "
            "its image processor's config): build the transform from that processor, or use the hf:NAME model "
            "spec, whose preprocessing comes from timm's NAME"
        )

    def returned_blocks(self, model: nn.Module, kwargs: dict[str, Any]) -> str:
        if kwargs.get("output_hidden_states", model.config.output_hidden_states):
            return "all"
        # a classifier returns only the head's output, the others their last_hidden_state too; SigLIP 2
        # pools with its per-patch padding mask, so its head reads the full grid
        classifier = "ForImageClassification" in type(model).__name__
        return "head" if classifier and not supported_models()[type(model)].patch_inputs else "last"

    def check_input(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not supported_models()[type(model)].patch_inputs:
            return super().check_input(model, args, kwargs)
        patches = self.image_input(args, kwargs)
        if not isinstance(patches, Tensor) or patches.ndim != 3:
            raise InputShapeError(
                f"{type(model).__name__} takes patch sequences pixel_values of shape (B, N, C * p * p) with "
                f"pixel_attention_mask and spatial_shapes (its image processor makes them), got "
                f"{tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__}")

    def check_outputs(self, model: nn.Module, outputs: str) -> None:
        if outputs == "reduced" and supported_models()[type(model)].patch_inputs:
            raise InvalidOptionError(f'{type(model).__name__} pools with a padding mask over every patch, so it needs '
                                     f'outputs="full"')

    def saving_methods(self, model: nn.Module) -> tuple[str, ...]:
        return ("save_pretrained",)

    def logits(self, output: Any) -> Tensor:
        return output.logits if hasattr(output, "logits") else output

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        # transformers' layers checkpoint only in training mode (modeling_layers.GradientCheckpointingLayer)
        return model.training and bool(getattr(model, "is_activation_checkpointing", False))

    def disable_checkpointing_hint(self) -> str:
        return "turn it off with model.activation_checkpointing_disable() (gradient_checkpointing_disable() before it)"

