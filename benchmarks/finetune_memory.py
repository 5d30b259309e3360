"""Peak resident memory and loop speed of ``tokenpatch finetune`` as the folders grow.

Builds a training folder and a separate validation folder of N images each from the shared sample
(see ``eval_memory.py``: images linked under new names, with ``labels.csv``), runs ``tokenpatch
finetune`` on the real DeiT-Tiny with ``--val-data`` for each size and each ``-j``, and samples the
proportional resident memory of the command and its data-loader workers every 50 ms. Memory must
not grow with the folders: the largest folders' peak should stay within 1.3x of the smallest's.
Prints a table; ``--json FILE`` also writes the rows.

    python benchmarks/finetune_memory.py --sizes 500 5000 --workers 0 2 --json benchmarks/results/finetune_memory.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from eval_memory import linked_folder, run_eval

from tokenpatch.data import DEIT_TINY_WEIGHTS
from tokenpatch.measure.report import format_table, write_json

from shared_data import add_data_option, shared_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--method", default="idle")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    shared = shared_data(parser, args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            train = linked_folder(shared, Path(scratch) / f"train_{size}", size)
            val = linked_folder(shared, Path(scratch) / f"val_{size}", size)
            for workers in args.workers:
                command = [sys.executable, "-m", "tokenpatch.cli", "finetune", "deit_tiny_patch16_224", "--checkpoint",
                           str(shared / DEIT_TINY_WEIGHTS), "--data", str(train), "--val-data", str(val),
                           "--method", args.method, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                           "-j", str(workers), "--json"]
                result, peak_kib, wall = run_eval(command)
                loop = result["loop"]
                rows.append({"train_images": result["train_images"], "val_images": result["val_images"],
                             "workers": workers, "peak_pss_mb": peak_kib / 1024, "wall_s": wall,
                             "loop_img_s": loop["loop_img_s"], "data_img_s": loop["data_img_s"],
                             "top1_before": result["before"]["top1"], "top1_after": result["after"]["top1"]})
                print(format_table(rows[-1:], digits=1).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(rows, digits=1))
    for workers in args.workers:
        peaks = {r["train_images"]: r["peak_pss_mb"] for r in rows if r["workers"] == workers}
        print(f"-j {workers}: peak at {max(peaks)} images / at {min(peaks)} images = "
              f"{peaks[max(peaks)] / peaks[min(peaks)]:.2f}x")
    if args.json:
        write_json({"command": " ".join(sys.argv), "method": args.method, "steps": args.steps,
                    "batch_size": args.batch_size, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
