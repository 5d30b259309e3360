"""The docs' table of supported model families (docs/models.md), generated from the families the tests build.

    python benchmarks/supported_families.py [--markdown]

Every small model of ``tests/model_zoo.py`` (timm and transformers) is built with random weights
and patched with every registered method: ``exact`` means keep 1.0 gave the unpatched output
bit for bit, a reduced pass (keep 0.5) gave a different one, and unpatching restored it; methods that
refuse the model are listed with the first words of their one-line reason.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import tokenpatch
from tokenpatch import TokenPatchError
from tokenpatch.backends import find_backend
from tokenpatch.measure.evaluate import logits_of
from tokenpatch.measure.report import format_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from model_zoo import supported_model_builds  # noqa: E402
from test_hf_families import run as run_hf_family  # noqa: E402


def _output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if type(model).__module__.startswith("transformers"):
            return run_hf_family(model)[0]
        return logits_of(model, model(x))


def check(model: torch.nn.Module, method: str) -> str:
    """"exact" when keep 1.0 is exact, 0.5 reduces and unpatch restores; else the refusal."""
    x = torch.randn(2, 3, *find_backend(model).input_size(model), generator=torch.Generator().manual_seed(1))
    reference = _output(model, x)
    try:
        tokenpatch.patch(model, method, keep_ratio=1.0)
    except TokenPatchError as refusal:
        return "refused: " + str(refusal).split(",")[0]
    same = torch.equal(_output(model, x), reference)
    tokenpatch.set_keep_ratio(model, 0.5)
    changed = not torch.equal(_output(model, x), reference)  # small grids can change it by < 1e-4 (pitome)
    tokenpatch.unpatch(model)
    return "exact" if same and changed and torch.equal(_output(model, x), reference) else "FAILED"


def rows(reasons: set[str]) -> list[dict[str, str]]:
    """One row per tested model: library, family key, model class, accepted methods, refusals
    (their reasons are added to ``reasons``)."""
    table = []
    for library, key, build in supported_model_builds():
        model = build()
        verdicts = {method: check(model, method) for method in sorted(tokenpatch.available_methods())}
        table.append(dict(library=library, test_model=key, model_class=type(model).__name__,
                          backend=find_backend(model).name,
                          exact=", ".join(m for m, v in verdicts.items() if v == "exact") or "-",
                          refused=", ".join(m for m, v in verdicts.items() if v.startswith("refused")) or "-",
                          failed=", ".join(m for m, v in verdicts.items() if v == "FAILED") or "-"))
        reasons.update(v.removeprefix("refused: ") for v in verdicts.values() if v.startswith("refused"))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for docs/models.md)")
    args = parser.parse_args(argv)
    reasons: set[str] = set()
    table = rows(reasons)
    if args.markdown:
        columns = list(table[0])
        print("| " + " | ".join(columns) + " |")
        print("|" + " --- |" * len(columns))
        for row in table:
            print("| " + " | ".join(row[c] for c in columns) + " |")
    else:
        print(format_table(table))
    print("\nrefusal reasons: " + "; ".join(sorted(reasons)))
    return 0 if all(row["failed"] == "-" for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
