"""Processes under ``torch.distributed`` (``torchrun``): whether there are several, which one
prints, and joining their group (shared by methods, training and the evaluation jobs)."""

from __future__ import annotations

import os

import torch


def in_process_group() -> bool:
    """True when ``torch.distributed`` is initialised (e.g. under ``torchrun``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the group (1 outside ``torch.distributed``)."""
    return torch.distributed.get_world_size() if in_process_group() else 1


def rank() -> int:
    """This process's rank in the group (0 outside ``torch.distributed``)."""
    return torch.distributed.get_rank() if in_process_group() else 0


def is_main_process() -> bool:
    """True for rank 0, or outside ``torch.distributed``: the process that prints and writes."""
    return rank() == 0


def join_process_group(device: torch.device) -> None:
    """Join the process group when started by ``torchrun`` with more than one process: nccl for a
    CUDA ``device`` (made this process's current device), gloo for the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or in_process_group():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
