"""What trimming the heap costs and buys, by how often it runs.

Each run is a fresh process that builds the validation set of ``tokenpatch finetune --val-data``
from N of the shared images (linked in turn, as ``eval_memory.py``) for the real DeiT-Tiny patched
with ``idle`` (the unpatched reference pass), then scores it once, with the heap trimmed after
every K-th batch (``tokenpatch.measure.allocator.TRIM_EVERY``; 0: never) in both passes. It
reports the scoring pass's images/s, the resident memory after it and the process's peak. The
runs alternate between the values of K, round after round, and the table has the medians over
the rounds:

    python benchmarks/heap_trim.py --images 1000 --every 0 1 8 --rounds 2 --json benchmarks/results/heap_trim.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eval_memory import linked_folder
from held_out_rss import resident_mb

from tokenpatch.measure.report import format_table, write_json

from shared_data import add_data_option, shared_data


def one_run(folder: Path, shared: Path, every: int) -> dict[str, float]:
    """Score ``folder`` with a trim every ``every`` batches; the scoring pass's figures."""
    from tokenpatch.data import DEIT_TINY_WEIGHTS, image_dataset, input_transform
    from tokenpatch.jobs.finetune import held_out
    from tokenpatch.jobs.models import PatchRequest, load_model
    from tokenpatch.measure import allocator

    allocator.TRIM_EVERY = every
    loaded = load_model("deit_tiny_patch16_224", str(shared / DEIT_TINY_WEIGHTS))
    model = loaded.patched(PatchRequest("idle"))
    dataset = image_dataset(folder, None, input_transform(loaded.preprocessing), 1000)
    val = held_out(model, dataset, batch_size=32)
    started = time.perf_counter()
    val.evaluate(model.eval())
    seconds = time.perf_counter() - started
    return {"img_s": len(dataset) / seconds, "rss_mb": resident_mb(),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--every", type=int, nargs="+", default=[0, 1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one run, in its own process
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    add_data_option(parser)
    args = parser.parse_args()
    shared = shared_data(parser, args)
    if args.child is not None:
        print(json.dumps(one_run(Path(args.folder), shared, args.child)))
        return
    folder = linked_folder(shared, Path(tempfile.mkdtemp()) / "val", args.images)
    runs: dict[int, list[dict[str, float]]] = {every: [] for every in args.every}
    for _ in range(args.rounds):
        for every in args.every:
            command = [sys.executable, __file__, "--child", str(every), "--folder", str(folder), "--data", str(shared)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[every].append(json.loads(output.strip().splitlines()[-1]))
    rows = [{"trim_every": every, "images": args.images, "rounds": args.rounds,
             **{key: statistics.median(run[key] for run in done) for key in ("img_s", "rss_mb", "peak_mb")}}
            for every, done in runs.items()]
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
