"""Model-family adapters, one file per family. ``find_backend`` picks the one that claims a model."""

from __future__ import annotations

from torch import nn

from ..core.blocks import Backend, BlockView
from ..errors import UnsupportedModelError
from .hf import HFBackend
from .timm import TimmBackend
from .timm_beit import BeitBackend
from .timm_eva import EvaBackend
from .timm_naflex import NaFlexBackend
from .timm_relpos import RelPosBackend

BACKENDS: list[Backend] = [TimmBackend(), EvaBackend(), BeitBackend(), RelPosBackend(), NaFlexBackend(), HFBackend()]


def find_backend(model: nn.Module) -> Backend:
    """The backend for ``model``, after checking the model is one it can patch.

    Raises:
        UnsupportedModelError: naming the model's class and what is supported.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    _refuse_wrapper(model)
    for backend in BACKENDS:
        if backend.claims(model):
            backend.check(model)
            return backend
    supported = "; ".join(b.supported for b in BACKENDS)
    raise UnsupportedModelError(f"cannot patch {type(model).__name__}: supported are {supported}")


def _refuse_wrapper(model: nn.Module) -> None:
    """Name the model inside a DataParallel/DDP/torch.compile wrapper instead of refusing it blindly."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise UnsupportedModelError(
            f"{type(model).__name__} wraps the model: patch the model itself, tokenpatch.patch(wrapper.module, ...) "
            "(or patch before wrapping)")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise UnsupportedModelError(
            "this is a torch.compile wrapper: patch the model before compiling it, or patch wrapper._orig_mod "
            "and compile again (the compiled graph was traced from the unpatched forward)")


__all__ = ["Backend", "BlockView", "BACKENDS", "find_backend"]
