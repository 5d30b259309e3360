"""tokenpatch: make pretrained Vision Transformers cheaper by computing on fewer tokens.

    import timm, tokenpatch
    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    tokenpatch.patch(model, method="idle", keep_ratio=0.5)
"""

from .api import available_methods, get_config, get_method_name, patch, set_keep_ratio, set_options, unpatch
from .checkpoint import load, load_config, save, save_config
from .core.method import Method, MethodConfig
from .core.records import BlockRecord, ScoreRecord, Trace
from .core.registry import register_method, unregister_method
from .core.runner import is_patched, output_positions, trace
from .errors import (
    AlreadyPatchedError,
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    DataError,
    InputShapeError,
    InvalidOptionError,
    NotPatchedError,
    TokenPatchError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .interpret import Explanation, explain
from .measure import BudgetFit, count_macs, set_macs_ratio
from .jobs.calibration import Calibration, calibrate
from .methods import (ATSConfig, DiffRateConfig, DynamicViTConfig, EViTConfig, IARed2Config, IdleConfig, PiToMeConfig,
                      PPTConfig, SaiTConfig, ToMeConfig)

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "set_keep_ratio",
    "set_macs_ratio",
    "BudgetFit",
    "set_options",
    "available_methods",
    "register_method",
    "unregister_method",
    "Method",
    "MethodConfig",
    "count_macs",
    "calibrate",
    "Calibration",
    "get_config",
    "get_method_name",
    "is_patched",
    "trace",
    "output_positions",
    "explain",
    "Explanation",
    "save",
    "load",
    "save_config",
    "load_config",
    "Trace",
    "BlockRecord",
    "ScoreRecord",
    "IdleConfig",
    "EViTConfig",
    "DynamicViTConfig",
    "SaiTConfig",
    "IARed2Config",
    "ToMeConfig",
    "ATSConfig",
    "PiToMeConfig",
    "PPTConfig",
    "DiffRateConfig",
    "TokenPatchError",
    "UnknownMethodError",
    "InvalidOptionError",
    "UnsupportedModelError",
    "NotPatchedError",
    "AlreadyPatchedError",
    "InputShapeError",
    "CheckpointError",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
    "DataError",
]
