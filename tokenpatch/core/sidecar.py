"""The files a patched transformers model's ``save_pretrained`` writes beside the model's own
(``config.json``, ``model.safetensors``), as PEFT writes ``adapter_config.json``:
``tokenpatch_config.json`` (method, options, tokenpatch version) and, for a method with modules
of its own (DynamicViT's predictors), ``tokenpatch_modules.safetensors``. A plain transformers
``from_pretrained`` reads neither and returns the unpatched model; ``tokenpatch.from_pretrained``
reads both and returns the patched one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Union

from safetensors.torch import save_file
from torch import Tensor

from ..files import write_atomically, write_text_atomically

CONFIG_FILE = "tokenpatch_config.json"
MODULES_FILE = "tokenpatch_modules.safetensors"


def write_sidecar(folder: Union[str, os.PathLike], config: Mapping[str, Any], modules: Mapping[str, Tensor]) -> None:
    """Write ``config`` (``{"method", "options", ...}``) and the method's ``modules`` weights (keys
    relative to its modules; none for most methods: then any older modules file is removed)."""
    folder = Path(folder)
    write_text_atomically(folder / CONFIG_FILE, json.dumps(dict(config), indent=2))
    if modules:
        state = {k: v.detach().contiguous() for k, v in modules.items()}
        write_atomically(folder / MODULES_FILE, lambda name: save_file(state, name))
    else:
        (folder / MODULES_FILE).unlink(missing_ok=True)
