"""Our fvcore MAC counts next to the published figures.

    python benchmarks/flops_table.py --json benchmarks/results/flops_table.json

Rows: unpatched DeiT-Ti/S/B at 224 (published 1.3 / 4.6 / 17.6 GMACs, precise 1.26 / 4.61 /
17.58); EViT with fusion on DeiT-S at keep 0.9 ... 0.5 (published 4.0 / 3.5 / 3.0 / 2.6 / 2.3);
``idle`` with its official inference schedule (the default: start block 3, geometric) and with
one keep ratio from block 2 on DeiT-S, whose reductions are checked against the claims "up to
33 % fewer FLOPs" (IdleViT) and "39-43 %" (SaiT).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import timm

import tokenpatch
from tokenpatch.measure.flops import count_macs
from tokenpatch.measure.report import format_table, write_json

UNPATCHED = {"deit_tiny_patch16_224": 1.26, "deit_small_patch16_224": 4.61, "deit_base_patch16_224": 17.58}
EVIT_FUSE_DEIT_S = {0.9: 4.0, 0.8: 3.5, 0.7: 3.0, 0.6: 2.6, 0.5: 2.3}
IDLE_SETTINGS = {
    "idle (official: start=3, geometric, fresh)": {},
    "idle constant start=2": {"schedule": "constant", "start_block": 2},
}


def _row(model: str, config: str, ratio: Optional[float], gmacs: float, base: float, published: Any) -> dict:
    return dict(model=model, config=config, keep_ratio=ratio, gmacs=gmacs, reduction_pct=100 * (1 - gmacs / base),
                published_gmacs=published)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    rows = []
    for name, published in UNPATCHED.items():
        gmacs = count_macs(timm.create_model(name, pretrained=False)).gmacs
        rows.append(_row(name, "unpatched", None, gmacs, gmacs, published))
    deit_s = timm.create_model("deit_small_patch16_224", pretrained=False)
    base = count_macs(deit_s).gmacs
    for ratio, published in EVIT_FUSE_DEIT_S.items():
        tokenpatch.patch(deit_s, "evit", keep_ratio=ratio, fuse=True)
        rows.append(_row("deit_small_patch16_224", "evit fuse", ratio, count_macs(deit_s).gmacs, base, published))
        tokenpatch.unpatch(deit_s)
    for label, options in IDLE_SETTINGS.items():
        for ratio in (0.9, 0.8, 0.7, 0.6, 0.5):
            tokenpatch.patch(deit_s, "idle", keep_ratio=ratio, **options)
            rows.append(_row("deit_small_patch16_224", label, ratio, count_macs(deit_s).gmacs, base, None))
            tokenpatch.unpatch(deit_s)
    print(format_table(rows, digits=3))
    if args.json:
        write_json({"rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
