"""The built-in methods, one file per paper; importing this package registers them all."""

from __future__ import annotations

from .ats import ATS, ATSConfig
from .dynamicvit import DynamicViT, DynamicViTConfig
from .evit import EViT, EViTConfig
from .iared2 import IARed2, IARed2Config
from .idle import Idle, IdleConfig
from .sait import SaiT, SaiTConfig
from .tome import ToMe, ToMeConfig

__all__ = ["ATS", "ATSConfig", "DynamicViT", "DynamicViTConfig", "EViT", "EViTConfig", "IARed2", "IARed2Config",
           "Idle", "IdleConfig", "SaiT", "SaiTConfig", "ToMe", "ToMeConfig"]
