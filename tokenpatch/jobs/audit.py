"""The ``tokenpatch audit`` job: MACs and throughput of patched copies against the unpatched model."""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

from torch import nn

from ..api import get_config, patch
from ..backends import find_backend
from ..measure.flops import count_macs
from ..measure.speed import compare_throughput, paired_speedup

AUDIT_COLUMNS = ["method", "keep_ratio", "gmacs_unpatched", "gmacs", "reduction_%", "ideal_speedup",
                 "img_s_unpatched", "img_s", "speedup"]


def audit_rows(model: nn.Module, methods: Sequence[str], keep_ratio: Optional[float], batch_size: int,
               repeats: int, device: str, options: Optional[dict[str, Any]] = None,
               macs_ratio: Optional[float] = None) -> list[dict[str, Any]]:
    """One row per method: MACs and measured throughput against the unpatched ``model``.

    With ``macs_ratio`` each method's keep ratio is solved for that share of the unpatched MACs.
    """
    size = find_backend(model).input_size(model)
    shape = (1, 3, *size)
    base_macs = count_macs(model, shape).total
    patched = {m: patch(copy.deepcopy(model), m, keep_ratio=keep_ratio, macs_ratio=macs_ratio, **(options or {}))
               for m in methods}
    macs = {m: count_macs(p, shape).total for m, p in patched.items()}
    timings = compare_throughput({"unpatched": model, **patched}, batch_size, size, repeats=repeats, device=device)
    params = sum(p.numel() for p in model.parameters())
    return [
        {
            "method": m, "keep_ratio": get_config(patched[m]).keep_ratio, "params": params,
            "macs": macs[m], "macs_unpatched": base_macs,
            "gmacs": macs[m] / 1e9, "gmacs_unpatched": base_macs / 1e9,
            "reduction": 1.0 - macs[m] / base_macs, "reduction_%": 100.0 * (1.0 - macs[m] / base_macs),
            "ideal_speedup": base_macs / macs[m],
            "throughput": timings[m].median, "throughput_unpatched": timings["unpatched"].median,
            "img_s": timings[m].median, "img_s_unpatched": timings["unpatched"].median,
            "speedup": paired_speedup(timings[m], timings["unpatched"]),
        }
        for m in methods
    ]
