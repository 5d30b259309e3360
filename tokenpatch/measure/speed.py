"""Throughput measurement: warm-up, repeats, medians, models timed alternately in one process."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ..progress import progress_bar


@dataclass(frozen=True)
class Throughput:
    """Images per second over repeated timed forwards.

    Attributes:
        median: median images/s.
        low, high: slowest and fastest run, images/s (the spread).
        rates: images/s of every timed run, in timing order.
    """

    median: float
    low: float
    high: float
    rates: tuple[float, ...]


def paired_speedup(fast: Throughput, slow: Throughput) -> float:
    """Median over repeats of the per-repeat throughput ratio of two alternately timed models.

    Each pair of runs was taken back to back, so drifting machine load cancels in the ratio.
    """
    return statistics.median(paired_ratios(fast, slow))


def paired_ratios(fast: Throughput, slow: Throughput) -> list[float]:
    """The per-repeat throughput ratios ``fast / slow`` of two alternately timed models, in timing order."""
    return [f / s for f, s in zip(fast.rates, slow.rates)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model: nn.Module, x: torch.Tensor, amp: Optional[torch.dtype] = None) -> float:
    """Seconds for one forward of ``x``, under autocast to ``amp`` if given (CUDA events on GPU, a
    monotonic clock on CPU)."""
    with torch.autocast(x.device.type, dtype=amp) if amp else nullcontext():
        if x.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize(x.device)
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        model(x)
        return time.perf_counter() - begin


@torch.inference_mode()
def compare_throughput(
    models: Mapping[str, nn.Module],
    batch_size: int,
    img_size: Union[int, tuple[int, int]] = 224,
    repeats: int = 10,
    warmup: int = 2,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    inputs: Optional[torch.Tensor] = None,
    amp: Optional[torch.dtype] = None,
    channels_last: bool = False,
) -> dict[str, Throughput]:
    """Time several models on the same random batch, alternating between them each repeat.

    Alternating spreads machine noise (other processes, clock changes) evenly over the models,
    so their ratio is trustworthy even when absolute numbers drift.

    Args:
        models: name -> model; each is put in eval mode on ``device`` (and ``dtype`` if given).
        batch_size: images per forward.
        img_size: square size or (H, W).
        repeats: timed forwards per model; the median is reported.
        warmup: untimed forwards per model first.
        device: ``"cpu"`` or ``"cuda"``.
        dtype: e.g. ``torch.float16`` on CUDA; None keeps the models' dtype.
        progress: show a progress bar.
        inputs: (batch_size, 3, H, W) images to time on instead of random data (methods whose
            token counts follow the image run as they would on real data).
        amp: autocast every forward to this dtype (``torch.bfloat16``, ``torch.float16``).
        channels_last: images and weights in the channels-last memory format.

    Returns:
        name -> :class:`Throughput`.
    """
    device = torch.device(device)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(batch_size, 3, h, w) if inputs is None else inputs[:batch_size]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device=device, dtype=dtype, memory_format=memory_format)
    for model in models.values():
        model.eval().to(device=device, dtype=dtype, memory_format=memory_format)
    for _ in range(warmup):
        for model in models.values():
            time_forward(model, x, amp)
    _sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in progress_bar(range(repeats), desc=f"timing batch {batch_size}", show=progress, leave=False):
        for name, model in models.items():
            seconds[name].append(time_forward(model, x, amp))
    return {name: _summarise(batch_size, s) for name, s in seconds.items()}


def _summarise(batch_size: int, seconds: list[float]) -> Throughput:
    rates = [batch_size / s for s in seconds]
    return Throughput(median=statistics.median(rates), low=min(rates), high=max(rates), rates=tuple(rates))


def benchmark(model: nn.Module, batch_size: int = 32, **kwargs) -> Throughput:
    """Throughput of one model; keyword arguments as in :func:`compare_throughput`."""
    return compare_throughput({"model": model}, batch_size, **kwargs)["model"]
