"""The interfaces between the engine and the model families: a block as pieces, a model as facts.

A backend (``tokenpatch/backends/``) is the only code that knows a model family's module names.
It implements :class:`Backend` for the family's models and turns one of their blocks into a
:class:`BlockView`: the pieces of a pre-norm transformer block (norm, q/k/v projections,
attention output projection, residual branches), which the methods compose into
reduced-token forwards (:mod:`tokenpatch.core.pieces`).

Projections take the tokens' original positions (``positions``, (B, N) indices into the
sequence that entered block 0) so that families whose attention depends on where a token sits
(rotary embeddings, relative position bias) can follow the tokens a method kept; families with
absolute position embeddings ignore them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from ..errors import InputShapeError, TokenPatchError


def check_images(images: Any) -> None:
    """Raise :class:`InputShapeError` unless ``images`` is a floating-point (B, C, H, W) tensor."""
    if not isinstance(images, Tensor):
        raise InputShapeError(f"expected an image tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise InputShapeError(f"expected images of shape (B, C, H, W), got a {images.ndim}-D tensor of shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputShapeError(f"expected floating-point images, normalised as the model's transform does, got "
                              f"{images.dtype}")


@dataclass(frozen=True)
class ModelFacts:
    """What a method may ask about the model it patches.

    Attributes:
        num_prefix: tokens before the patches (class, distillation, registers).
        depth: transformer blocks.
        class_token: True when the first prefix token is a class token (SigLIP and ``*_gap_*``
            models have none: their prefix, if any, is registers).
        pools_class_token: True when the head reads only prefix tokens.
    """

    num_prefix: int
    depth: int
    class_token: bool
    pools_class_token: bool


class BlockView(ABC):
    """One pre-norm transformer block, exposed as composable pieces.

    Shapes: ``x`` is (B, N, C) residual-stream tokens; ``xn`` is ``norm1(x)``; per-head
    projections are (B, H, N, D) with ``H * D`` the attention width.
    """

    num_heads: int
    head_dim: int
    scale: float
    #: True when attention depends on where tokens sit (rotary embeddings, relative position
    #: bias): a block that runs on fewer tokens must then run from these pieces, with positions
    uses_positions: bool = False

    @property
    @abstractmethod
    def attn_dropout(self) -> float:
        """Attention-probability dropout to apply now (0 in eval mode)."""

    @abstractmethod
    def norm1(self, x: Tensor) -> Tensor:
        """Pre-attention norm, (B, N, C) -> (B, N, C)."""

    @abstractmethod
    def qkv(self, xn: Tensor, positions: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of (B, N, C) ``xn``, each (B, H, N, D), q/k norms applied.

        ``positions``: (B, N) original positions of the tokens (None: ``0..N-1``).
        """

    @abstractmethod
    def query(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """Queries only, (B, N, C) -> (B, H, N, D); ``positions`` as in :meth:`qkv`."""

    @abstractmethod
    def key(self, xn: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """Keys only, (B, N, C) -> (B, H, N, D); ``positions`` as in :meth:`qkv`."""

    @abstractmethod
    def value(self, xn: Tensor) -> Tensor:
        """Values only, (B, N, C) -> (B, H, N, D)."""

    @abstractmethod
    def attention_output(self, o: Tensor, xn: Tensor) -> Tensor:
        """Merge heads and project: (B, H, N, D) attention result -> (B, N, C) branch output."""

    def attention_bias(self, query_positions: Optional[Tensor], key_positions: Optional[Tensor]) -> Optional[Tensor]:
        """Additive (B, H, Nq, Nk) logit bias for these query and key positions (relative position
        bias families), or None (the default: no bias)."""
        return None

    @abstractmethod
    def add_attention(self, x: Tensor, y: Tensor) -> Tensor:
        """First residual: ``x + drop_path(layer_scale(y))``."""

    @abstractmethod
    def mlp_residual(self, x: Tensor) -> Tensor:
        """Second residual branch: ``x + drop_path(layer_scale(mlp(norm2(x))))``."""


class Backend(ABC):
    """Adapter for one model family (timm, Hugging Face transformers, ...).

    Implement it in one file under ``tokenpatch/backends/`` and add an instance to
    ``tokenpatch.backends.BACKENDS`` (see CONTRIBUTING.md).
    """

    name: str
    supported: str  # one sentence naming the model classes this backend patches

    @abstractmethod
    def claims(self, model: nn.Module) -> bool:
        """True when the model belongs to this backend's family (it may still be unsupported)."""

    @abstractmethod
    def check(self, model: nn.Module) -> None:
        """Raise :class:`~tokenpatch.errors.UnsupportedModelError` if the model can't be patched."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in execution order."""

    @abstractmethod
    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches (class, distillation, registers)."""

    def has_class_token(self, model: nn.Module) -> bool:
        """True when the first prefix token is a class token."""
        return True

    def facts(self, model: nn.Module) -> ModelFacts:
        """The :class:`ModelFacts` of ``model``."""
        return ModelFacts(self.num_prefix_tokens(model), len(self.blocks(model)), self.has_class_token(model),
                          self.pools_class_token(model))

    @abstractmethod
    def embed_dim(self, model: nn.Module) -> int:
        """Token width C of the residual stream."""

    @abstractmethod
    def pools_class_token(self, model: nn.Module) -> bool:
        """True when the model's outputs read only prefix tokens (so padding tokens can't leak in)."""

    @abstractmethod
    def head(self, model: nn.Module) -> nn.Module:
        """The classifier; its input is the pooled (B, C) feature the logits are computed from."""

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm the last block's (B, N, C) tokens pass through before pooling (token
        distillation compares its outputs). Families that do not name one refuse it."""
        raise TokenPatchError(f"token distillation: tokenpatch does not know the final norm of "
                              f"{type(model).__name__} ({self.name} models)")

    @abstractmethod
    def view(self, block: nn.Module, extra: dict[str, Any]) -> BlockView:
        """The block as a :class:`BlockView`, for one call with the ``extra`` arguments
        :meth:`block_input` returned (e.g. the rotary table)."""

    @abstractmethod
    def block_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """The (B, N, C) tokens among a block call's arguments, and the other arguments the block
        needs (by keyword, e.g. ``rope``); reject arguments it can't honour."""

    def run_original(self, forward: Any, x: Tensor, extra: dict[str, Any]) -> Tensor:
        """The block's own, unpatched ``forward`` (a bound callable) on (B, N, C) tokens."""
        return forward(x, **extra)

    def block_output(self, block: nn.Module, x: Tensor) -> Any:
        """Wrap ``block``'s (B, N', C) result the way the family's blocks return it."""
        return x

    @abstractmethod
    def image_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The image tensor among a model call's arguments (for input checks)."""

    def check_input(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise :class:`InputShapeError` unless a call of ``model`` gets what it takes (by default
        a (B, C, H, W) image tensor)."""
        check_images(self.image_input(args, kwargs))

    def check_outputs(self, model: nn.Module, outputs: str) -> None:
        """Raise :class:`~tokenpatch.errors.InvalidOptionError` if the model can't return
        ``outputs`` (``"full"`` or ``"reduced"``) tokens; every family can by default."""

    @abstractmethod
    def input_size(self, model: nn.Module) -> tuple[int, int]:
        """The (H, W) image size the model takes by default."""

    @abstractmethod
    def data_config(self, model: nn.Module) -> dict[str, Any]:
        """How the model's inputs are prepared, as timm's data config: ``input_size`` (C, H, W),
        ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``."""

    def returned_blocks(self, model: nn.Module, kwargs: dict[str, Any]) -> str:
        """Which block outputs a call ``model(**kwargs)`` returns to its caller: ``"head"`` (only
        what the head computes from the last block, which then sees the method's own tokens),
        ``"last"`` (the last block's tokens, e.g. a feature model's ``last_hidden_state``) or
        ``"all"`` (every block's, e.g. ``hidden_states``). Those come back as the full grid."""
        return "head"

    def all_block_outputs(self, model: nn.Module) -> tuple[str, ...]:
        """Names of the model's methods that return every block's output (timm's
        ``forward_intermediates``): the patch makes each of those outputs the full grid."""
        return ()

    def saving_methods(self, model: nn.Module) -> tuple[str, ...]:
        """Names of the model's methods that save it with its configuration (transformers'
        ``save_pretrained``): the patch makes each also write the tokenpatch config beside it."""
        return ()

    def logits(self, output: Any) -> Tensor:
        """The (B, classes) logits in one of the family's model outputs."""
        return output

    @abstractmethod
    def gradient_checkpointing(self, model: nn.Module) -> bool:
        """True when a call of the model with gradients on would re-run its blocks in backward
        (activation checkpointing is on and applies in the model's current mode)."""

    def disable_checkpointing_hint(self) -> str:
        """How a user turns activation checkpointing off for this family."""
        return "turn activation checkpointing off"
