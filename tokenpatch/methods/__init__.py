"""The method registry: one small module per method."""

from __future__ import annotations

from ..errors import UnknownMethodError
from .ats import ATS, ATSConfig
from .base import Method, MethodConfig
from .dynamicvit import DynamicViT, DynamicViTConfig
from .evit import EViT, EViTConfig
from .iared2 import IARed2, IARed2Config
from .idle import Idle, IdleConfig
from .sait import SaiT, SaiTConfig
from .tome import ToMe, ToMeConfig

METHODS: dict[str, Method] = {m.name: m for m in (Idle(), EViT(), DynamicViT(), SaiT(), IARed2(), ToMe(), ATS())}


def get_method(name: str) -> Method:
    """The registered method called ``name``, or a clear error listing the available ones."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


__all__ = ["METHODS", "Method", "MethodConfig", "get_method", "ATSConfig", "DynamicViTConfig", "EViTConfig", "IARed2Config", "IdleConfig", "SaiTConfig", "ToMeConfig"]
