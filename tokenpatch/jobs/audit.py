"""The ``tokenpatch audit`` job: MACs and throughput of patched copies against the unpatched model."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..api import get_config
from ..backends import find_backend
from ..errors import TokenPatchError
from ..measure.flops import count_macs
from ..measure.runtime import Runtime
from ..measure.speed import Throughput, compare_throughput, paired_ratios

#: the keys of every audit row (``params`` too), in the table's order. ``speedup`` is defined once:
#: the median over the timed rounds of patched ÷ unpatched images/s, both timed back to back in the
#: round; ``speedup_low``/``speedup_high`` are the lowest and highest round (it is not the ratio of
#: the two median images/s, which come from different rounds)
AUDIT_COLUMNS = ["method", "keep_ratio", "gmacs_unpatched", "gmacs", "macs_ratio", "ideal_speedup",
                 "img_s_unpatched", "img_s", "speedup", "speedup_low", "speedup_high"]
#: columns added by ``compiled=True``: the same models under ``torch.compile``, compared with each other
COMPILED_COLUMNS = ["img_s_unpatched_compiled", "img_s_compiled", "speedup_compiled", "speedup_compiled_low",
                    "speedup_compiled_high"]


def audit_rows(model: nn.Module, patched: Mapping[str, nn.Module], batch_size: int, repeats: int,
               runtime: Runtime = Runtime(), compiled: bool = False) -> list[dict[str, Any]]:
    """One row per patched model (named by its key): MACs and measured throughput against the
    unpatched ``model``, every model timed on ``runtime``'s device, autocast and memory format.

    With ``compiled`` every model, the unpatched one included, is also timed under
    ``torch.compile`` (default inductor backend; compiling takes a while), adding the
    :data:`COMPILED_COLUMNS`: compiled patched against compiled unpatched.
    """
    size = find_backend(model).input_size(model)
    shape = (1, 3, *size)
    base_macs = count_macs(model, shape).total
    macs = {m: count_macs(p, shape).total for m, p in patched.items()}
    models = {"unpatched": model, **patched}
    timings = _throughput(models, batch_size, size, repeats, runtime)
    compiled_timings = _compiled_throughput(models, batch_size, size, repeats, runtime) if compiled else {}
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for m in patched:
        row = {
            "method": m, "keep_ratio": get_config(patched[m]).keep_ratio, "params": params,
            "gmacs_unpatched": base_macs / 1e9, "gmacs": macs[m] / 1e9, "macs_ratio": macs[m] / base_macs,
            "ideal_speedup": base_macs / macs[m], **_speed(timings, m, ""),
        }
        if compiled_timings:
            row.update(_speed(compiled_timings, m, "_compiled"))
        rows.append(row)
    return rows


def _speed(timings: Mapping[str, Throughput], name: str, suffix: str) -> dict[str, float]:
    """The images/s of ``name`` and of the unpatched model and the speed-up with its spread, keys ending in ``suffix``."""
    ratios = paired_ratios(timings[name], timings["unpatched"])
    return {f"img_s_unpatched{suffix}": timings["unpatched"].median, f"img_s{suffix}": timings[name].median,
            f"speedup{suffix}": statistics.median(ratios), f"speedup{suffix}_low": min(ratios),
            f"speedup{suffix}_high": max(ratios)}


def _throughput(models: Mapping[str, nn.Module], batch_size: int, size: tuple[int, int], repeats: int,
                runtime: Runtime) -> dict[str, Throughput]:
    return compare_throughput(models, batch_size, size, repeats=repeats, device=runtime.device, amp=runtime.amp_dtype,
                              channels_last=runtime.channels_last)


def _compiled_throughput(models: dict[str, nn.Module], batch_size: int, size: tuple[int, int], repeats: int,
                         runtime: Runtime) -> dict[str, Throughput]:
    """Throughput of every model under ``torch.compile``, timed alternately; a one-line error if compiling fails."""
    try:
        return _throughput({name: torch.compile(m) for name, m in models.items()}, batch_size, size, repeats, runtime)
    except Exception as exc:  # inductor needs a working C++ (or CUDA) toolchain
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenPatchError(f"torch.compile failed ({type(exc).__name__}: {first_line}); "
                              "audit without --compile, or fix the compiler set-up") from exc
