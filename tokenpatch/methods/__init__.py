"""The built-in methods, one file per paper; importing this package imports every module in it,
and each registers its method (a new file here is a new method, with no other edit)."""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

# The option classes of the first methods, importable from here and from ``tokenpatch``.
from .ats import ATSConfig  # noqa: E402
from .diffrate import DiffRateConfig  # noqa: E402
from .dynamicvit import DynamicViTConfig  # noqa: E402
from .evit import EViTConfig  # noqa: E402
from .iared2 import IARed2Config  # noqa: E402
from .idle import IdleConfig  # noqa: E402
from .pitome import PiToMeConfig  # noqa: E402
from .ppt import PPTConfig  # noqa: E402
from .sait import SaiTConfig  # noqa: E402
from .tome import ToMeConfig  # noqa: E402

__all__ = ["ATSConfig", "DiffRateConfig", "DynamicViTConfig", "EViTConfig", "IARed2Config", "IdleConfig", "PiToMeConfig",
           "PPTConfig", "SaiTConfig", "ToMeConfig"]
