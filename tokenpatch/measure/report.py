"""Plain-text tables and JSON output for benchmarks and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union


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
