"""What a token-reduction method is: an options dataclass, a per-block schedule and a block forward."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional, Sequence

from torch import Tensor, nn

from ..backends.base import BlockView
from ..engine import PassState
from ..errors import InvalidOptionError


def check_keep_ratio(keep_ratio: Any) -> float:
    """``keep_ratio`` as a float in (0, 1], or a clear error."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
        raise InvalidOptionError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if not 0.0 < float(keep_ratio) <= 1.0:  # also rejects NaN
        raise InvalidOptionError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    return float(keep_ratio)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidOptionError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_blocks(name: str, blocks: Sequence[int], depth: int) -> None:
    """Raise unless every block index is in ``range(depth)``."""
    bad = [b for b in blocks if not isinstance(b, int) or not 0 <= b < depth]
    if bad:
        raise InvalidOptionError(f"{name} must be block indices in [0, {depth}), got {list(blocks)}")


@dataclasses.dataclass
class MethodConfig:
    """Options shared by every method. Subclasses add their own fields.

    Attributes:
        keep_ratio: fraction of patch tokens kept, in (0, 1]; 1.0 reproduces the unpatched model.
    """

    keep_ratio: float = 0.5

    def validate(self, depth: int) -> None:
        """Raise :class:`InvalidOptionError` if an option is out of range for a ``depth``-block model."""
        self.keep_ratio = check_keep_ratio(self.keep_ratio)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


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


class Method(ABC):
    """A token-reduction method.

    ``schedule`` says which blocks reduce and by how much; ``reduce_block`` is the forward of a
    reducing block, composed from :mod:`tokenpatch.engine`. Blocks with no ratio in the schedule
    run their original forward untouched.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    #: options fixed at patch time because the method's modules are built from them
    structural_options: ClassVar[frozenset[str]] = frozenset()

    def build_modules(self, config: MethodConfig, depth: int, width: int) -> Optional[nn.Module]:
        """Trainable modules the method adds to the model (saved with its weights), or None.

        Args:
            width: the model's token width C.
        """
        return None

    def check_compatible(self, config: MethodConfig, pools_class_token: bool) -> None:
        """Raise :class:`InvalidOptionError` if ``config`` can't work on a model with this pooling."""

    def training_overrides(self, config: MethodConfig, step: int) -> dict[str, Any]:
        """Options to use for fine-tuning step ``step`` (1-based) instead of ``config``'s; {} for none."""
        return {}

    @abstractmethod
    def schedule(self, config: MethodConfig, depth: int) -> list[Optional[float]]:
        """Per block: the keep ratio it applies, or None for an untouched block."""

    @abstractmethod
    def reduce_block(
        self, view: BlockView, x: Tensor, state: PassState, block: int, ratio: float, config: MethodConfig
    ) -> Tensor:
        """Forward of a reducing block: (B, N, C) tokens in, (B, N', C) tokens out."""
