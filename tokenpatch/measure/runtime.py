"""Where and how the commands run a model: the device (``--device``), autocast (``--amp``) and the
memory format (``--channels-last``), the flags of timm's ``validate.py``."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import ContextManager, Optional

import torch
from torch import Tensor, nn

from ..errors import TokenPatchError

#: ``--amp`` names -> autocast dtypes
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The device ``name`` (``cpu``, ``cuda`` or ``cuda:N``) means here. A bare ``cuda`` under
    ``torchrun`` is this process's GPU (``LOCAL_RANK``), else the current one.

    Raises:
        TokenPatchError: an unknown device, or a CUDA device this machine does not have (one line).
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise TokenPatchError(f"unknown device {name!r}: expected cpu, cuda or cuda:N") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise TokenPatchError(f"device {name!r} is not supported: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise TokenPatchError(f"--device {name} was asked for, but torch sees no CUDA device")
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    if index >= torch.cuda.device_count():
        raise TokenPatchError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Runtime:
    """The device models and images go to, the autocast precision (``"bf16"``, ``"fp16"`` or None
    for the model's own) and whether images and weights use the channels-last memory format."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: Optional[str] = None
    channels_last: bool = False

    @classmethod
    def named(cls, device: str = "cpu", amp: Optional[str] = None, channels_last: bool = False) -> "Runtime":
        """A runtime from the command-line spellings (see :func:`resolve_device`)."""
        if amp is not None and amp not in AMP_DTYPES:
            raise TokenPatchError(f"--amp {amp!r}: expected one of {', '.join(AMP_DTYPES)}")
        return cls(resolve_device(device), amp, channels_last)

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES[self.amp] if self.amp else None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def pin_memory(self) -> bool:
        """Whether a ``DataLoader`` should pin its batches (copies to a GPU then overlap compute)."""
        return self.device.type == "cuda"

    def place(self, model: nn.Module) -> nn.Module:
        """``model`` (and the method modules it holds) on the device, in the memory format; in place."""
        return model.to(self.device, memory_format=self.memory_format)

    def inputs(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) ``images`` on the device, in the memory format."""
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def autocast(self) -> ContextManager:
        """Autocast to the ``amp`` dtype on the device (nothing without ``amp``)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp else nullcontext()

    def describe(self) -> str:
        """E.g. ``cuda:0, bf16 autocast, channels-last``."""
        parts = [str(self.device)] + ([f"{self.amp} autocast"] if self.amp else []) + (
            ["channels-last"] if self.channels_last else [])
        return ", ".join(parts)
