"""tokenpatch: make pretrained Vision Transformers cheaper by computing on fewer tokens.

    import timm, tokenpatch
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tokenpatch.patch(model, method="idle", keep_ratio=0.5)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use: ``import tokenpatch``
# (and ``tokenpatch --help`` or ``--version``) does not import torch, timm or transformers.
# Type checkers read the same names from __init__.pyi.
_EXPORTS = {
    "patch": ".api",
    "unpatch": ".api",
    "set_keep_ratio": ".api",
    "set_macs_ratio": ".measure",
    "BudgetFit": ".measure",
    "set_options": ".api",
    "available_methods": ".api",
    "register_method": ".core.registry",
    "unregister_method": ".core.registry",
    "Method": ".core.method",
    "MethodConfig": ".core.method",
    "count_macs": ".measure",
    "calibrate": ".jobs.calibration",
    "Calibration": ".jobs.calibration",
    "get_config": ".api",
    "get_method_name": ".api",
    "is_patched": ".core.runner",
    "trace": ".core.runner",
    "output_positions": ".core.runner",
    "explain": ".interpret",
    "Explanation": ".interpret",
    "save": ".checkpoint",
    "load": ".checkpoint",
    "save_config": ".checkpoint",
    "load_config": ".checkpoint",
    "from_pretrained": ".hub",
    "Trace": ".core.records",
    "BlockRecord": ".core.records",
    "ScoreRecord": ".core.records",
    "IdleConfig": ".methods",
    "EViTConfig": ".methods",
    "DynamicViTConfig": ".methods",
    "SaiTConfig": ".methods",
    "IARed2Config": ".methods",
    "ToMeConfig": ".methods",
    "ATSConfig": ".methods",
    "PiToMeConfig": ".methods",
    "PPTConfig": ".methods",
    "DiffRateConfig": ".methods",
    "TokenPatchError": ".errors",
    "UnknownMethodError": ".errors",
    "InvalidOptionError": ".errors",
    "UnsupportedModelError": ".errors",
    "NotPatchedError": ".errors",
    "AlreadyPatchedError": ".errors",
    "InputShapeError": ".errors",
    "CheckpointError": ".errors",
    "CorruptCheckpointError": ".errors",
    "CheckpointMismatchError": ".errors",
    "DataError": ".errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A public name (or a submodule, ``tokenpatch.checkpoint``) imported when first asked for."""
    if name in _EXPORTS:
        importlib.import_module(".api", __name__)  # registers the built-in methods before any registry call
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

