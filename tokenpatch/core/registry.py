"""The method registry: a method registers itself by name; everything else looks it up here."""

from __future__ import annotations

from typing import TypeVar

from ..errors import InvalidOptionError, UnknownMethodError
from .method import Method, MethodConfig

METHODS: dict[str, Method] = {}

#: the method ``patch`` and the CLI use when none is named: ToMe's merging ranks tokens by their
#: similarity, not by one model's class-token attention, and lost the least top-1 training-free
#: at 55-75 % of the MACs on the real DeiT-Tiny (docs/benchmarks/leaderboard.md)
DEFAULT_METHOD = "tome"

MethodClass = TypeVar("MethodClass", bound=type)


def register_method(method_class: MethodClass) -> MethodClass:
    """Register a :class:`Method` subclass under its ``name`` (usable as a class decorator).

    After registration ``tokenpatch.patch(model, method=NAME)`` and every tool (save/load,
    trace, MAC counting and budgets, fine-tuning, explanation, the CLI) accept it.

    Raises:
        InvalidOptionError: not a Method subclass, no name or config dataclass, or the name is taken
            by another class.
    """
    if not (isinstance(method_class, type) and issubclass(method_class, Method)):
        raise InvalidOptionError(f"register_method expects a Method subclass, got {method_class!r}")
    name = getattr(method_class, "name", None)
    config_class = getattr(method_class, "config_class", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise InvalidOptionError(f"{method_class.__name__}.name must be an identifier, got {name!r}")
    if not (isinstance(config_class, type) and issubclass(config_class, MethodConfig)):
        raise InvalidOptionError(f"{method_class.__name__}.config_class must be a MethodConfig dataclass")
    existing = METHODS.get(name)
    if existing is not None and type(existing) is not method_class:
        raise InvalidOptionError(f"a method named {name!r} is already registered ({type(existing).__name__})")
    METHODS[name] = method_class()
    return method_class


def unregister_method(name: str) -> None:
    """Remove a registered method (e.g. a test's own); models patched with it keep working."""
    METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method called ``name``, or a clear error listing the available ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def fixed_count_methods() -> list[str]:
    """Registered methods whose default options keep image-independent token counts (exportable)."""
    return sorted(name for name, m in METHODS.items() if m.fixed_token_counts(m.config_class()))


def training_free_methods() -> list[str]:
    """Registered methods that work without training (no learned policy to fit first)."""
    return sorted(name for name, m in METHODS.items() if not m.needs_training)
