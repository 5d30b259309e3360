"""The resumable training state of :func:`tokenpatch.training.finetune`: one file, written atomically.

It holds what the next step depends on: the patched model's weights (its method modules included),
those of its moving average when the run keeps one, the optimizer's moments, the fp16 grad scaler,
the step, the position in the data (epoch and batches read in it), the time spent under a time
budget and every process's random generators (torch, CUDA, Python, NumPy). With the same data, seed
and options, a resumed run reaches the same weights as an uninterrupted one (bit for bit on the
CPU). It is read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..core.distributed import in_process_group, is_main_process, rank, world_size
from ..core.runner import context_of
from ..errors import CheckpointError
from ..files import write_atomically

FORMAT = "tokenpatch-training-state"
VERSION = 1


@dataclass
class Position:
    """Where a run stands: optimisation steps done, the epoch being read and batches of it read
    by this process, and seconds spent (time budgets)."""

    step: int = 0
    epoch: int = 0
    batches: int = 0
    seconds: float = 0.0


@dataclass
class Resumed:
    """What a state file gives a resumed run: its position and the optimizer and scaler states."""

    position: Position
    optimizer: dict[str, Any]
    scaler: Optional[dict[str, Any]] = None
    rng: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """This process's generator states (torch, CUDA when in use, Python, NumPy) as tensors and
    plain values, so that ``weights_only`` loading reads them back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _every_process(value: Any) -> list[Any]:
    """``value`` of every process, by rank (one under no ``torchrun``)."""
    if not in_process_group():
        return [value]
    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def _identity(model: nn.Module) -> dict[str, Any]:
    """What a state must match to be resumed on ``model``: its method, options and process count."""
    ctx = context_of(model)
    return {"method": ctx.method.name, "options": ctx.config.to_dict(), "world_size": world_size()}


def save_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, position: Position,
               scaler: Optional[torch.amp.GradScaler] = None, ema: Optional[nn.Module] = None) -> None:
    """Write the training state of every process to ``path`` (rank 0 writes; all must call);
    ``ema``: the model's moving average, when the run keeps one."""
    rng = _every_process(rng_state())
    if not is_main_process():
        return
    payload = {"format": FORMAT, "version": VERSION, **_identity(model), "model": model.state_dict(),
               "ema": ema.state_dict() if ema is not None else None,
               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
               "position": vars(position).copy(), "rng": rng}
    write_atomically(path, lambda name: torch.save(payload, name))


def load_state(path: str, model: nn.Module, ema: Optional[nn.Module] = None) -> Resumed:
    """Read a state written by :func:`save_state` into ``model`` (weights and method modules) and
    ``ema`` (the moving average, when the run keeps one) and return the rest for the loop.

    Raises:
        CheckpointError: the file is missing, not a training state, or written by another
            method, other options, another number of processes or with(out) a moving average.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"--resume {path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a state we wrote
        raise CheckpointError(f"--resume {path}: not a readable training state ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path}: not a tokenpatch training state")
    expected = _identity(model)
    for key, value in expected.items():
        if payload.get(key) != value:
            raise CheckpointError(f"--resume {path}: written with {key} {payload.get(key)!r}, this run has {value!r}")
    if (payload.get("ema") is None) != (ema is None):
        written = "without" if ema is not None else "with"
        raise CheckpointError(f"--resume {path}: written {written} a moving average of the weights (--ema-decay), "
                              "this run differs")
    model.load_state_dict(payload["model"])
    if ema is not None:
        ema.load_state_dict(payload["ema"])
    return Resumed(Position(**payload["position"]), payload["optimizer"], payload["scaler"], payload["rng"][rank()])
