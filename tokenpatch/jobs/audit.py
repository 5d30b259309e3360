"""The ``tokenpatch audit`` job: MACs and throughput of patched copies against the unpatched model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..api import get_config
from ..backends import find_backend
from ..errors import TokenPatchError
from ..measure.flops import count_macs
from ..measure.runtime import Runtime
from ..measure.speed import Throughput, compare_throughput, paired_speedup

AUDIT_COLUMNS = ["method", "keep_ratio", "gmacs_unpatched", "gmacs", "reduction_%", "ideal_speedup",
                 "img_s_unpatched", "img_s", "speedup"]
#: columns added by ``compiled=True``: the same models under ``torch.compile``, compared with each other
COMPILED_COLUMNS = ["img_s_unpatched_compiled", "img_s_compiled", "speedup_compiled"]


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
            "macs": macs[m], "macs_unpatched": base_macs,
            "gmacs": macs[m] / 1e9, "gmacs_unpatched": base_macs / 1e9,
            "reduction": 1.0 - macs[m] / base_macs, "reduction_%": 100.0 * (1.0 - macs[m] / base_macs),
            "ideal_speedup": base_macs / macs[m],
            "throughput": timings[m].median, "throughput_unpatched": timings["unpatched"].median,
            "img_s": timings[m].median, "img_s_unpatched": timings["unpatched"].median,
            "speedup": paired_speedup(timings[m], timings["unpatched"]),
        }
        if compiled_timings:
            row.update(img_s_unpatched_compiled=compiled_timings["unpatched"].median,
                       img_s_compiled=compiled_timings[m].median,
                       speedup_compiled=paired_speedup(compiled_timings[m], compiled_timings["unpatched"]))
        rows.append(row)
    return rows


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
