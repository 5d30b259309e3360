"""Model-family adapters. ``find_backend`` picks the one that claims a model."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Backend, BlockView
from .hf import HFBackend
from .timm import TimmBackend

BACKENDS: list[Backend] = [TimmBackend(), HFBackend()]


def find_backend(model: nn.Module) -> Backend:
    """The backend for ``model``, after checking the model is one it can patch.

    Raises:
        UnsupportedModelError: naming the model's class and what is supported.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for backend in BACKENDS:
        if backend.claims(model):
            backend.check(model)
            return backend
    supported = "; ".join(b.supported for b in BACKENDS)
    raise UnsupportedModelError(f"cannot patch {type(model).__name__}: supported are {supported}")


__all__ = ["Backend", "BlockView", "BACKENDS", "find_backend"]
