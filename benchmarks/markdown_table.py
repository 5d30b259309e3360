"""Print a committed result file's rows as a Markdown table, for the docs' benchmark pages.

    python benchmarks/markdown_table.py benchmarks/results/leaderboard.json --columns budget method top1 agreement

Numbers keep one decimal (three for shares below 2: MAC ratios, keep ratios), so a table in the
docs is the file's content, not a transcription.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def cell(value: Any) -> str:
    """A value as the docs show it."""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 2 else f"{value:.1f}"
    return "–" if value is None else str(value)


def rows_of(results: Any) -> list[dict[str, Any]]:
    """The rows of a result file's content: its ``rows``, or the file itself when it is a list of them."""
    return results if isinstance(results, list) else results["rows"]


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as a Markdown table of ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a JSON file written by a benchmark's --json")
    parser.add_argument("--columns", nargs="+", help="columns to show (default: every key of the first row)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        rows = rows_of(json.load(f))
    print(markdown(rows, args.columns or list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
