"""Backend for Hugging Face transformers ViT and DeiT (the 5.x layout).

Read against transformers 5.23: ``ViTModel``/``DeiTModel`` hold ``embeddings`` and ``layers``
(a ModuleList of ``ViTLayer``/``DeiTLayer``); a layer has ``layernorm_before``, ``attention``
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``scaling``, ``attention_dropout``),
``layernorm_after``, ``mlp`` (``fc1``, ``fc2``) and ``dropout`` on both residual branches.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor, nn

from ..core.blocks import Backend, BlockView
from ..errors import TokenPatchError, UnsupportedModelError

LAYER_MODULES = ("layernorm_before", "attention.q_proj", "attention.k_proj", "attention.v_proj",
                 "attention.o_proj", "layernorm_after", "mlp.fc1", "mlp.fc2")


def _transformers_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(supported model classes, supported layer classes), empty when transformers is absent."""
    try:
        from transformers.models.deit import modeling_deit as deit
        from transformers.models.vit import modeling_vit as vit
    except ImportError:
        return (), ()
    models = (vit.ViTModel, vit.ViTForImageClassification, deit.DeiTModel, deit.DeiTForImageClassification,
              deit.DeiTForImageClassificationWithTeacher)
    return models, (vit.ViTLayer, deit.DeiTLayer)


class HFBlockView(BlockView):
    """A transformers ``ViTLayer``/``DeiTLayer`` as composable pieces."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.attn = layer.attention
        self.head_dim = self.attn.head_dim
        self.num_heads = self.attn.q_proj.out_features // self.head_dim
        self.scale = self.attn.scaling

    @property
    def attn_dropout(self) -> float:
        return self.attn.attention_dropout if self.attn.training else 0.0

    def norm1(self, x: Tensor) -> Tensor:
        return self.layer.layernorm_before(x)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, -1, self.head_dim).transpose(1, 2)

    # Absolute position embeddings: the projections do not depend on where a token sits.
    def qkv(self, xn: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        return self.query(xn), self.key(xn), self.value(xn)

    def query(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._heads(self.attn.q_proj(xn))

    def key(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        return self._heads(self.attn.k_proj(xn))

    def value(self, xn: Tensor) -> Tensor:
        return self._heads(self.attn.v_proj(xn))

    def attention_output(self, o: Tensor, xn: Tensor) -> Tensor:
        b, _, n, _ = o.shape
        return self.attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))

    def add_attention(self, x: Tensor, y: Tensor) -> Tensor:
        return x + self.layer.dropout(y)

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.layer.dropout(self.layer.mlp(self.layer.layernorm_after(x)))


def _base_model(model: nn.Module) -> nn.Module:
    """The ``ViTModel``/``DeiTModel`` inside a task model (or the model itself)."""
    for name in ("vit", "deit"):
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


class HFBackend(Backend):
    """transformers ViT and DeiT models (image classification heads included)."""

    name = "hf"
    supported = (
        "transformers ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification and "
        "DeiTForImageClassificationWithTeacher (transformers 5.x: layers with q_proj/k_proj/v_proj/o_proj, fc1/fc2)"
    )

    def claims(self, model: nn.Module) -> bool:
        models, _ = _transformers_classes()
        return bool(models) and isinstance(model, models)

    def check(self, model: nn.Module) -> None:
        _, layer_classes = _transformers_classes()
        layers = getattr(_base_model(model), "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no `layers` ModuleList; expected the transformers 5.x layout: {self.supported}"
            )
        for i, layer in enumerate(layers):
            missing = _missing_modules(layer)
            if not isinstance(layer, layer_classes) or missing:
                raise UnsupportedModelError(
                    f"{type(model).__name__}.layers[{i}] ({type(layer).__name__}) lacks {missing or 'a supported class'}; "
                    f"expected modules {list(LAYER_MODULES)}"
                )

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(_base_model(model).layers)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        embeddings = _base_model(model).embeddings
        return 1 + int(getattr(embeddings, "distillation_token", None) is not None)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def pools_class_token(self, model: nn.Module) -> bool:
        # The classifiers read the class (and distillation) token; the base models' pooler reads the
        # class token, but their last_hidden_state shows every token, padding included.
        return True

    def head(self, model: nn.Module) -> nn.Module:
        for name in ("classifier", "cls_classifier"):  # DeiT with teacher: the class-token head
            if isinstance(getattr(model, name, None), nn.Module):
                return getattr(model, name)
        raise TokenPatchError(
            f"{type(model).__name__} has no classification head (classifier); use a *ForImageClassification model"
        )

    def view(self, block: nn.Module, extra: dict[str, Any]) -> BlockView:
        return HFBlockView(block)

    def block_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        x = args[0] if args else kwargs["hidden_states"]
        attention_mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if attention_mask is not None:
            raise TokenPatchError(
                "a patched transformers model does not support attention_mask: token reduction changes the "
                "sequence length the mask was built for; unpatch the model to use masks"
            )
        if kwargs.get("output_attentions"):
            raise TokenPatchError(
                "output_attentions is not supported on a patched model: reduced blocks compute attention on "
                "subsets of tokens, so there is no full attention map to return; use tokenpatch.trace(model) to "
                "see which tokens each block computed"
            )
        return x, {}

    def image_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        return args[0] if args else kwargs.get("pixel_values")

    def input_size(self, model: nn.Module) -> tuple[int, int]:
        size = model.config.image_size
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
        # a base model returns its last_hidden_state; a task model only the head's output
        return "last" if _base_model(model) is model else "head"

    def logits(self, output: Any) -> Tensor:
        return output.logits if hasattr(output, "logits") else output

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return bool(getattr(model, "is_activation_checkpointing", False))

    def disable_checkpointing_hint(self) -> str:
        return "turn it off with model.gradient_checkpointing_disable()"


def _missing_modules(layer: nn.Module) -> list[str]:
    names = dict(layer.named_modules())
    return [m for m in LAYER_MODULES if m not in names]
