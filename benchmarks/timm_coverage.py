"""Share of timm's pretrained tags in the isotropic-transformer modules that tokenpatch patches.

    python benchmarks/timm_coverage.py --json benchmarks/results/timm_coverage.json

Every architecture is built on the meta device (no weights, no download) and offered to
``tokenpatch.patch``'s backend check; prints accepted/total per timm module and the refusals.
"""

from __future__ import annotations

import argparse
import sys

import timm

from tokenpatch.backends.coverage import ISOTROPIC_MODULES, timm_coverage
from tokenpatch.measure.report import format_table, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", default=list(ISOTROPIC_MODULES), help="timm model modules")
    parser.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    report = timm_coverage(tuple(args.modules))
    rows = [{"module": m, "tags": report.tags[m], "accepted": report.accepted[m],
             "share_%": 100.0 * report.accepted[m] / max(1, report.tags[m])} for m in args.modules]
    total, accepted = sum(report.tags.values()), sum(report.accepted.values())
    rows.append({"module": "all", "tags": total, "accepted": accepted, "share_%": 100.0 * report.share})
    print(f"timm {timm.__version__}: pretrained tags tokenpatch.patch accepts")
    print(format_table(rows, ["module", "tags", "accepted", "share_%"], digits=1))
    print("\nrefused tags by reason:")
    print(format_table([{"tags": n, "reason": r} for r, n in report.refusals.most_common()], ["tags", "reason"]))
    if args.json:
        write_json({"timm": timm.__version__, "rows": rows, "refusals": dict(report.refusals)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
