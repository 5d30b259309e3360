"""Plain-text tables, JSON output and results files for benchmarks and the CLI."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..errors import TokenPatchError

#: version of the layout of ``results.json``; raised when a key changes meaning or goes away
RESULTS_SCHEMA_VERSION = 2  # 2: audit rows as jobs.audit.AUDIT_COLUMNS (macs_ratio, the speed-up's spread)
_VERSIONED = ("tokenpatch", "torch", "torchvision", "timm", "transformers", "huggingface_hub", "fvcore")


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Optional[Sequence[str]] = None, digits: int = 3) -> str:
    """Rows of dicts as an aligned text table (floats rounded to ``digits``)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    cells = [[_cell(r.get(c), digits) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(data: Any, path: Union[str, Path]) -> None:
    """Write ``data`` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def versions() -> dict[str, Optional[str]]:
    """Python's and the installed versions of tokenpatch and the libraries it runs on (None: not installed)."""
    found: dict[str, Optional[str]] = {"python": platform.python_version()}
    for package in _VERSIONED:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def device_name(device: Union[str, torch.device]) -> str:
    """``device`` in words for a results file: the GPU's name, or the CPU's model (Linux) or architecture."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"cpu: {models[0] if models else platform.machine()}"


def write_results(folder: Union[str, Path], header: dict[str, Any], rows: Sequence[dict[str, Any]],
                  columns: Sequence[str]) -> list[Path]:
    """A command's table as ``folder/results.json`` (``schema_version``, the ``header`` (command
    line, device, ...), library ``versions`` and every row with all its keys) and
    ``folder/results.csv`` (the table's ``columns``, plus ``note`` when a row has one).

    Returns:
        The two paths written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TokenPatchError(f"{folder} is a file, not a folder for results.json and results.csv")
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "results.json", folder / "results.csv"
    write_json({"schema_version": RESULTS_SCHEMA_VERSION, **header, "versions": versions(), "results": list(rows)},
               json_path)
    fields = list(columns) + (["note"] if any("note" in r for r in rows) else [])
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]
