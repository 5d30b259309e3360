"""Whether this process is one of several under ``torch.distributed`` (shared by methods and training)."""

from __future__ import annotations

import torch


def in_process_group() -> bool:
    """True when ``torch.distributed`` is initialised (e.g. under ``torchrun``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
