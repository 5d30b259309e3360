"""What a token-reduction method is, and everything it owns.

A method is one class (one file under ``tokenpatch/methods/``, or a user's own module) that
subclasses :class:`Method` and registers itself with :func:`~tokenpatch.core.registry.register_method`.
It owns:

- its options: a :class:`MethodConfig` dataclass (typed fields, checked strictly by
  :func:`~tokenpatch.core.options.coerce_fields`, plus its own range checks in ``validate``);
- its per-block schedule (:meth:`Method.schedule`) and reduced block forward
  (:meth:`Method.reduce_block`);
- its per-pass state (:meth:`Method.start_pass`), which lives in the pass, never on the model;
- its trainable modules, training signals and losses with their weights;
- whether its token counts are fixed (traceable/exportable), how a MAC budget maps to its
  options, the options under which its scores explain every patch, and the option variants
  the generic test suites run it with.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Literal, Optional, Sequence, TypeVar

from torch import Tensor, nn

from ..errors import InvalidOptionError
from .blocks import BlockView, ModelFacts
from .options import coerce_fields

if TYPE_CHECKING:  # the pass state names the method's types only in annotations
    from .state import PassState


def check_keep_ratio(keep_ratio: Any) -> float:
    """``keep_ratio`` as a float in (0, 1], or a clear error."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise InvalidOptionError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if not 0.0 < float(keep_ratio) <= 1.0:  # also rejects NaN
        raise InvalidOptionError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


def check_blocks(name: str, blocks: Sequence[int], depth: int) -> None:
    """Raise unless every block index is in ``range(depth)``."""
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise InvalidOptionError(f"{name} must be block indices in [0, {depth}), got {list(blocks)}")


def check_block(name: str, block: Optional[int], depth: int) -> None:
    """Raise unless ``block`` is None or a block index in ``range(depth)``."""
    if block is not None and not 0 <= block < depth:
        raise InvalidOptionError(f"{name} must be in [0, {depth}), got {block!r}")


def check_positive(name: str, value: Optional[float], allow_zero: bool = False) -> None:
    """Raise unless ``value`` is None or > 0 (>= 0 with ``allow_zero``)."""
    if value is not None and not (value >= 0 if allow_zero else value > 0):
        raise InvalidOptionError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")


@dataclasses.dataclass
class MethodConfig:
    """Options shared by every method. Subclasses add their own typed fields.

    Attributes:
        keep_ratio: fraction of patch tokens kept, in (0, 1]; 1.0 reproduces the unpatched model.
    """

    keep_ratio: float = 0.5

    def validate(self, depth: int) -> None:
        """Check types and ranges for a ``depth``-block model, normalising values in place.

        Subclasses call ``super().validate(depth)`` first, then check their ranges.

        Raises:
            InvalidOptionError: naming the option and what it accepts.
        """
        coerce_fields(self)
        self.keep_ratio = check_keep_ratio(self.keep_ratio)

    def check_model(self, facts: ModelFacts) -> None:
        """Raise :class:`InvalidOptionError` if an option can't apply to a model with these facts."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class ScoringConfig(MethodConfig):
    """Options of a method that scores patches by the attention one query pays them.

    Attributes:
        scorer: whose attention: ``"class_token"`` the class token's (the papers' rule);
            ``"mean_query"`` the mean of the patches' queries, which needs no class token
            (SigLIP, ``*_gap_*``): its attention estimates the attention each patch receives
            from all patches, measured against the class token's in docs/methods/index.md; ``"auto"``
            the class token where the model has one, else the mean query.
    """

    scorer: Literal["auto", "class_token", "mean_query"] = "auto"

    def check_model(self, facts: ModelFacts) -> None:
        if self.scorer == "class_token" and not facts.class_token:
            raise InvalidOptionError("scorer='class_token' needs a class token and this model has none; "
                                     "use scorer='auto' or 'mean_query'")


def require_class_token_pooling(why: str, pools_class_token: bool, advice: str = "") -> None:
    """Raise unless the model reads only its class token: padding tokens would leak into an average pool.

    Args:
        why: what pads, e.g. ``"ats pads each batch to its largest token count"``.
        advice: an optional way out, appended to the message.
    """
    if not pools_class_token:
        raise InvalidOptionError(f"{why}, and this model pools over all tokens (e.g. timm global_pool='avg'), "
                                 f"so padding would change its output{advice}")


def quarter_blocks(depth: int) -> tuple[int, ...]:
    """Blocks at 1/4, 2/4 and 3/4 of the depth: (3, 6, 9) for the usual 12 blocks."""
    return tuple(sorted({max(1, depth * i // 4) for i in (1, 2, 3)} - {depth}))


ConfigT = TypeVar("ConfigT", bound=MethodConfig)
StateT = TypeVar("StateT")

#: a method's training loss: (patched model after its training pass, (B,) per-sample task loss) -> scalar
LossTerm = Callable[[nn.Module, Tensor], Tensor]


class Method(ABC, Generic[ConfigT, StateT]):
    """A token-reduction method, generic over its options ``ConfigT`` and per-pass state ``StateT``.

    ``schedule`` says which blocks reduce and by how much; ``reduce_block`` is the forward of a
    reducing block, composed from :mod:`tokenpatch.core.pieces`. Blocks with no ratio in the
    schedule run their original forward untouched.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    #: options fixed at patch time because the method's modules are built from them
    structural_options: ClassVar[frozenset[str]] = frozenset()
    #: the options that select the paper's own rule where a default differs from it: the authors'
    #: checkpoints load with them (:func:`~tokenpatch.checkpoint.load_official`), and so does a
    #: :func:`~tokenpatch.save` file written before such an option existed
    official_options: ClassVar[dict[str, Any]] = {}
    #: option sets the generic test suites run besides the defaults, by a short name
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    #: True when the method's own modules must be trained before it is useful (a learned policy)
    needs_training: ClassVar[bool] = False
    #: True when training-mode passes keep every token in place and record which ones count
    #: (:meth:`kept_token_mask`), as token distillation needs
    masks_tokens_in_training: ClassVar[bool] = False

    @abstractmethod
    def schedule(self, config: ConfigT, depth: int) -> list[Optional[float]]:
        """Per block: the keep ratio it applies, or None for an untouched block."""

    @abstractmethod
    def reduce_block(self, view: BlockView, x: Tensor, state: "PassState[StateT]", block: int, ratio: float,
                     config: ConfigT) -> Tensor:
        """Forward of a reducing block: (B, N, C) tokens in, (B, N', C) tokens out."""

    def restore_grid(self, x: Tensor, state: "PassState[StateT]") -> Tensor:
        """The full (B, N, C) token grid behind a block's (B, M, C) output ``x``, for callers that
        read every token (dense features, intermediates): by default each current token at its
        original position and each dropped token as it left (:meth:`PassState.to_grid`); a merging
        method copies a merged token to every position it stands for."""
        return state.to_grid(x)

    def start_pass(self, config: ConfigT) -> StateT:
        """A fresh per-pass state of the method (``state.own`` in :meth:`reduce_block`); None by default."""
        return None  # type: ignore[return-value]

    def build_modules(self, config: ConfigT, depth: int, width: int) -> Optional[nn.Module]:
        """Trainable modules the method adds to the model (saved with its weights), or None.

        Args:
            width: the model's token width C.
        """
        return None

    def kept_token_mask(self, model: nn.Module) -> Tensor:
        """(B, N) mask over the patch tokens of this thread's last training-mode pass of
        ``model``: 1 where a token was kept to the end, 0 where masked out. Only methods with
        :attr:`masks_tokens_in_training` have one."""
        raise NotImplementedError(f"{self.name} keeps no token mask in training")

    def official_module_keys(self, keys: Sequence[str]) -> dict[str, str]:
        """Which of ``keys`` (of a state dict saved by the method's official code) are the weights
        of the modules :meth:`build_modules` makes, renamed: ``{official key: module key}`` (keys
        relative to the modules). Empty when the method has no modules or the keys hold none."""
        return {}

    def check_compatible(self, config: ConfigT, facts: ModelFacts) -> None:
        """Raise :class:`InvalidOptionError` if ``config`` can't work on a model with these facts."""

    def training_overrides(self, config: ConfigT, step: int) -> dict[str, Any]:
        """Options to use for fine-tuning step ``step`` (1-based) instead of ``config``'s; {} for none."""
        return {}

    def training_signals(self, config: ConfigT) -> frozenset[str]:
        """Extra signals its losses need a training pass to produce (e.g. ``"attention"``)."""
        return frozenset()

    def training_losses(self, config: ConfigT) -> list[tuple[float, LossTerm]]:
        """(weight, loss) pairs fine-tuning adds to the distillation loss; [] for none."""
        return []

    def fixed_token_counts(self, config: ConfigT) -> bool:
        """True when the tokens each block keeps do not depend on the image (traceable, exportable)."""
        return True

    def budget_options(self, config: ConfigT, keep_ratio: float) -> dict[str, Any]:
        """Options that spend the budget a keep ratio stands for (MAC-budget fitting bisects on it).

        Raises:
            InvalidOptionError: when the current options can't be fitted to a budget.
        """
        return {"keep_ratio": keep_ratio}

    def calibration_options(self, config: ConfigT) -> list[dict[str, Any]]:
        """Option sets :func:`~tokenpatch.calibrate` fits to the budget and compares, each over
        ``config`` (the default: ``config`` alone)."""
        return [{}]

    def explanation_options(self, config: ConfigT) -> Optional[dict[str, Any]]:
        """Options under which a pass records the method's scores for every patch, or None when the
        method records no scores worth a map (see :func:`tokenpatch.interpret.score_map`)."""
        return None
