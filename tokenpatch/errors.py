"""Exceptions raised by tokenpatch.

Every error a user can trigger with bad input is one of these, with a message that names the
problem and, where there is one, the accepted alternatives.
"""

from __future__ import annotations

from typing import Any


class TokenPatchError(ValueError):
    """Base class of every tokenpatch error caused by a bad argument or model."""


class UnknownMethodError(TokenPatchError):
    """The requested method name is not registered."""


class InvalidOptionError(TokenPatchError):
    """A method option is unknown or its value is out of range."""


class UnreachableBudgetError(InvalidOptionError):
    """A method cannot spend the asked share of the unpatched MACs on this model (within the tolerance)."""


class UnsupportedModelError(TokenPatchError):
    """The model's class or layout is not one a backend can patch."""


class NotPatchedError(TokenPatchError):
    """An operation that needs a patched model was given an unpatched one."""


class AlreadyPatchedError(TokenPatchError):
    """`patch` was called on a model that is already patched."""


class InputShapeError(TokenPatchError):
    """The patched model was called with an input of the wrong shape."""


class CheckpointError(TokenPatchError):
    """A weights file cannot be used: missing, empty, truncated, not a safetensors or torch state
    dict, or without tokenpatch metadata where one is needed. The message names the path."""


class CorruptCheckpointError(CheckpointError):
    """A tokenpatch checkpoint's tensors do not match the digest :func:`tokenpatch.save` recorded."""


class CheckpointMismatchError(CheckpointError):
    """A readable weights file does not fit the model (keys, shapes) or names a method or options
    this tokenpatch cannot build."""


class DataError(TokenPatchError):
    """An image folder, labels file or image cannot be read. The message names the path."""


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut short for a one-line error: it names a value, not thousands of digits."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's conversion limit
        return "an integer of more than 4300 digits"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
