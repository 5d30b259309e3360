"""Every small model the tests build, by library: what the supported-models table (docs/models.md) covers."""

from __future__ import annotations

from typing import Callable

import torch

from conftest import FAMILY_MODELS, SMALL_MODELS, make_family_model, make_model
from test_hf import HF_MODELS
from test_hf import build as build_hf
from test_hf_families import MODELS as HF_FAMILY_MODELS
from test_hf_families import build as build_hf_family


def supported_model_builds() -> list[tuple[str, str, Callable[[], torch.nn.Module]]]:
    """(library, test model key, builder) of every small timm and transformers model the tests build."""
    builds = [("timm", k, lambda k=k: make_model(k)) for k in SMALL_MODELS]
    builds += [("timm", k, lambda k=k: make_family_model(k)) for k in FAMILY_MODELS]
    builds += [("transformers", k, lambda k=k: build_hf(k)) for k in HF_MODELS]
    builds += [("transformers", k, lambda k=k: build_hf_family(k)) for k in HF_FAMILY_MODELS]
    return builds
