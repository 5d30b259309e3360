"""Peak resident memory and speed of ``tokenpatch eval`` as the folder grows.

Builds flat labelled folders of N images from the shared sample (each image linked N/500 times
under new names, with a matching ``labels.csv``), runs ``tokenpatch eval`` on the real DeiT-Tiny
for each size and each ``-j``, and samples the proportional resident memory (PSS, shared pages
split between the processes sharing them) of the command and its data-loader workers every 50 ms. Memory must not grow with the folder: the largest folder's peak should stay
within 1.3x of the smallest's. Prints a table; ``--json FILE`` also writes the rows.

    python benchmarks/eval_memory.py --sizes 500 5000 --workers 0 2 --json benchmarks/results/eval_memory.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenpatch.data import DEIT_TINY_WEIGHTS, IMAGENET_SAMPLE
from tokenpatch.measure.report import format_table, write_json

from shared_data import add_data_option, shared_data


def linked_folder(shared: Path, target: Path, size: int) -> Path:
    """A flat folder of ``size`` images (the sample's images linked in turn) and its labels.csv."""
    with open(shared / IMAGENET_SAMPLE / "labels.csv", newline="") as f:
        sample = list(csv.DictReader(f))
    target.mkdir(parents=True)
    rows = []
    for i in range(size):
        source = sample[i % len(sample)]
        name = f"{i:06d}_{source['file']}"
        os.symlink(shared / IMAGENET_SAMPLE / source["file"], target / name)
        rows.append(f"{name},{source['class_index']}\n")
    (target / "labels.csv").write_text("file,class_index\n" + "".join(rows))
    return target


def _tree_pss_kib(pid: int) -> int:
    """Proportional resident memory (KiB) of ``pid`` and every process below it, from /proc (Linux):
    pages shared by the data-loader workers with the process that forked them count once in all."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total


def run_eval(command: list[str]) -> tuple[dict, int, float]:
    """(the command's JSON output, peak proportional resident KiB of its process tree, wall seconds)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        peak = 0
        while process.poll() is None:
            peak = max(peak, _tree_pss_kib(process.pid))
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{err.read()[-2000:]}")
        return json.loads(out.read()), peak, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--methods", nargs="+", default=["tome"])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    shared = shared_data(parser, args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            folder = linked_folder(shared, Path(scratch) / f"images_{size}", size)
            for workers in args.workers:
                command = [sys.executable, "-m", "tokenpatch.cli", "eval", "deit_tiny_patch16_224", "--checkpoint",
                           str(shared / DEIT_TINY_WEIGHTS), "--data", str(folder), "--methods", *args.methods,
                           "--batch-size", str(args.batch_size), "-j", str(workers), "--json"]
                result, peak_kib, wall = run_eval(command)
                rows.append({"images": result["images"], "workers": workers, "peak_pss_mb": peak_kib / 1024,
                             "wall_s": wall, "eval_s": result["seconds"],
                             # each image through the unpatched model and every method
                             "img_s": result["images"] / result["seconds"],
                             "top1_unpatched": result["results"][0]["top1"]})
                print(format_table(rows[-1:], digits=1).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(rows, digits=1))
    for workers in args.workers:
        peaks = {r["images"]: r["peak_pss_mb"] for r in rows if r["workers"] == workers}
        print(f"-j {workers}: peak at {max(peaks)} images / at {min(peaks)} images = "
              f"{peaks[max(peaks)] / peaks[min(peaks)]:.2f}x")
    if args.json:
        write_json({"command": " ".join(sys.argv), "methods": args.methods, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
