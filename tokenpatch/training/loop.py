"""Bookkeeping of the fine-tuning loop: when it stops (steps or a time budget) and where its time goes."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from tqdm.auto import tqdm

from .. import progress
from ..core.distributed import in_process_group
from ..errors import InvalidOptionError

PHASES = ("data", "teacher", "student")


class Budget:
    """When fine-tuning stops: after ``steps`` steps or, when ``minutes`` is given, at the first
    step boundary past that much time.

    Under ``torchrun`` the elapsed time is the largest over the processes (one all-reduce per
    step), so every process sees the same progress, sets the same learning rate and stops at the
    same step.
    """

    def __init__(self, steps: int, minutes: Optional[float] = None, spent: float = 0.0) -> None:
        if minutes is not None and not minutes > 0:
            raise InvalidOptionError(f"minutes must be > 0, got {minutes}")
        if minutes is None and not (isinstance(steps, int) and steps >= 1):
            raise InvalidOptionError(f"steps must be a positive integer, got {steps!r}")
        self.steps = steps
        self.seconds = None if minutes is None else 60.0 * minutes
        self.started = time.perf_counter() - spent  # a resumed run counts the time spent before
        self.spent = spent  # under a time budget: the agreed elapsed seconds at the end of the last step

    def elapsed(self) -> float:
        """Seconds since the start, agreed between processes under ``torchrun``."""
        elapsed = torch.tensor(time.perf_counter() - self.started, dtype=torch.float64)
        if in_process_group():
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        return float(elapsed)

    def progress(self, step: int, warmup_steps: int) -> float:
        """Share of the budget spent after ``warmup_steps``, before 0-based ``step``: in steps or in time."""
        if self.seconds is not None:
            return self.spent / self.seconds
        return (step - warmup_steps) / max(1, self.steps - warmup_steps)

    def done(self, step: int) -> bool:
        """True when the loop must stop after 1-based ``step``."""
        if self.seconds is None:
            return step >= self.steps
        self.spent = self.elapsed()
        return self.spent >= self.seconds

    def spent_so_far(self) -> float:
        """Seconds spent, as the last :meth:`done` agreed under a time budget (else measured now)."""
        return self.spent if self.seconds is not None else self.elapsed()

    def progress_bar(self, enabled: bool, done: int = 0) -> tqdm:
        """A bar over the steps (``done`` of them already), or over the seconds of a time budget."""
        if self.seconds is None:
            return progress.progress_bar(total=self.steps, initial=done, desc="finetune", show=enabled)
        return progress.progress_bar(total=round(self.seconds), initial=min(round(self.spent), round(self.seconds)),
                                     desc="finetune", unit="s", show=enabled)

    def advance(self, bar: tqdm, step: int, **postfix: Any) -> None:
        """Move ``bar`` to the end of 1-based ``step`` and show ``postfix``."""
        bar.update(1 if self.seconds is None else min(round(self.spent), bar.total) - bar.n)
        bar.set_postfix(**({"step": step, **postfix} if self.seconds is not None else postfix))


class LoopTimes:
    """Seconds the loop spends in each phase (loading data, the teacher, the student's step) and
    the images it trained on."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.images = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the time spent inside the context to phase ``name`` (GPU work is waited for)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - started

    def rates(self) -> dict[str, float]:
        """Images/s of each phase alone (``data_img_s``, ``teacher_img_s``, ``student_img_s``) and of
        the loop (``loop_img_s``); phases not timed yet are left out."""
        timed = {f"{name}_img_s": self.seconds[name] for name in PHASES if self.seconds.get(name)}
        total = sum(self.seconds.values())
        rates = {key: self.images / seconds for key, seconds in timed.items()}
        if total > 0:
            rates["loop_img_s"] = self.images / total
        return rates
