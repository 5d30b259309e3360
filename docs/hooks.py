"""MkDocs hooks: pages generated at build time, so they cannot go stale.

- ``<!-- cli-reference -->`` becomes every command's ``--help``, from the parser itself.
- ``<!-- results: FILE columns=A,B,C [where=KEY=VALUE] -->`` becomes a table of the rows of a
  committed result file (``benchmarks/results/*.json``), printed by ``benchmarks/markdown_table.py``
  and captioned with the file's name;
  ``where`` keeps the rows whose KEY's first word is VALUE (``method=dynamicvit`` keeps the rows of
  ``dynamicvit (untrained)``; ``idle:idle_update=unchanged`` is another word than ``idle``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = re.compile(r"<!-- results: (\S+) columns=(\S+)(?: where=(\w+)=(\S+))? -->")


def cli_reference() -> str:
    """Markdown of ``tokenpatch --help`` and every command's ``--help``."""
    from tokenpatch.cli import build_parser
    from tokenpatch.cli.parser import COMMANDS

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    parts = ["```text\n" + parser.format_help() + "```"]
    for name, summary in COMMANDS.items():
        parts.append(f"## tokenpatch {name}\n\n{summary}.\n\n```text\n{commands[name].format_help()}```")
    return "\n\n".join(parts)


def results_table(match: re.Match) -> str:
    """The Markdown table a ``<!-- results: ... -->`` marker asks for."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from markdown_table import markdown, rows_of

    path, columns, key, value = match.groups()
    rows = rows_of(json.loads((ROOT / path).read_text()))
    if key is not None:
        rows = [row for row in rows if str(row.get(key)).split(" ")[0] == value]
    return markdown(rows, columns.split(",")) + f"\n\n*Generated from `{path}`.*"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (the hook's signature)
    markdown = markdown.replace("<!-- cli-reference -->", cli_reference()) if "<!-- cli-reference -->" in markdown else markdown
    return RESULTS.sub(results_table, markdown)
