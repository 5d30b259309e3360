"""Exceptions raised by tokenpatch.

Every error a user can trigger with bad input is one of these, with a message that names the
problem and, where there is one, the accepted alternatives.
"""

from __future__ import annotations


class TokenPatchError(ValueError):
    """Base class of every tokenpatch error caused by a bad argument or model."""


class UnknownMethodError(TokenPatchError):
    """The requested method name is not registered."""


class InvalidOptionError(TokenPatchError):
    """A method option is unknown or its value is out of range."""


class UnsupportedModelError(TokenPatchError):
    """The model's class or layout is not one a backend can patch."""


class NotPatchedError(TokenPatchError):
    """An operation that needs a patched model was given an unpatched one."""


class AlreadyPatchedError(TokenPatchError):
    """`patch` was called on a model that is already patched."""


class InputShapeError(TokenPatchError):
    """The patched model was called with an input of the wrong shape."""
