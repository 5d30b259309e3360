"""Type stub of the lazily imported public API (tokenpatch/__init__.py imports each on first use)."""

__version__: str
__all__: list[str]

from .api import (
    available_methods as available_methods,
    get_config as get_config,
    get_method_name as get_method_name,
    patch as patch,
    set_keep_ratio as set_keep_ratio,
    set_options as set_options,
    unpatch as unpatch,
)
from .checkpoint import (
    load as load,
    load_config as load_config,
    save as save,
    save_config as save_config,
)
from .hub import (
    from_pretrained as from_pretrained,
)
from .core.method import (
    Method as Method,
    MethodConfig as MethodConfig,
)
from .core.records import (
    BlockRecord as BlockRecord,
    ScoreRecord as ScoreRecord,
    Trace as Trace,
)
from .core.registry import (
    register_method as register_method,
    unregister_method as unregister_method,
)
from .core.runner import (
    is_patched as is_patched,
    output_positions as output_positions,
    trace as trace,
)
from .errors import (
    AlreadyPatchedError as AlreadyPatchedError,
    CheckpointError as CheckpointError,
    CheckpointMismatchError as CheckpointMismatchError,
    CorruptCheckpointError as CorruptCheckpointError,
    DataError as DataError,
    InputShapeError as InputShapeError,
    InvalidOptionError as InvalidOptionError,
    NotPatchedError as NotPatchedError,
    TokenPatchError as TokenPatchError,
    UnknownMethodError as UnknownMethodError,
    UnsupportedModelError as UnsupportedModelError,
)
from .interpret import (
    Explanation as Explanation,
    explain as explain,
)
from .measure import (
    BudgetFit as BudgetFit,
    count_macs as count_macs,
    set_macs_ratio as set_macs_ratio,
)
from .jobs.calibration import (
    Calibration as Calibration,
    calibrate as calibrate,
)
from .methods import (
    ATSConfig as ATSConfig,
    DiffRateConfig as DiffRateConfig,
    DynamicViTConfig as DynamicViTConfig,
    EViTConfig as EViTConfig,
    IARed2Config as IARed2Config,
    IdleConfig as IdleConfig,
    PiToMeConfig as PiToMeConfig,
    PPTConfig as PPTConfig,
    SaiTConfig as SaiTConfig,
    ToMeConfig as ToMeConfig,
)
