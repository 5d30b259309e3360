"""One patched model called from several threads: how many outputs differ from the sequential ones.

    python benchmarks/thread_safety.py --json benchmarks/results/thread_safety.json

For every registered method (defaults, keep ratio 0.5) on a small random-weight DeiT (depth 4,
64 px), ``--threads`` threads each make ``--calls`` forward calls, cycling through batch sizes 1
to 4; an output counts as wrong when it is not bit-identical to the same batch run alone in one
thread; a call that raises counts as raised. A second test races ``set_keep_ratio`` (toggling
0.5 and 0.25 in one thread) against forwards in two others: an output is mixed when it equals
neither ratio's sequential output. Uses the public API only.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import timm
import torch

import tokenpatch
from tokenpatch.measure.report import format_table, write_json


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, num_classes=10).eval()


def run_threads(call, count: int, calls: int) -> list[list]:
    """``call(i, n)`` for n in range(calls) in each of ``count`` threads: per thread, each call's
    output, or the exception it raised."""
    results: list[list] = [[] for _ in range(count)]

    def target(i: int) -> None:
        with torch.no_grad():
            for n in range(calls):
                try:
                    results[i].append(call(i, n))
                except Exception as exc:  # noqa: BLE001 - counted as a failed call
                    results[i].append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def shared_model_row(method: str, threads: int, calls: int) -> dict:
    model = tokenpatch.patch(small_model(), method, keep_ratio=0.5)
    batches = [torch.randn(b, 3, 64, 64, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 3, 4)]
    with torch.no_grad():
        expected = [model(b) for b in batches]

    results = run_threads(lambda i, n: model(batches[(n + i) % len(batches)]), threads, calls)
    raised = sum(isinstance(o, Exception) for r in results for o in r)
    wrong = sum(not torch.equal(o, expected[(n + i) % len(batches)])
                for i, r in enumerate(results) for n, o in enumerate(r) if not isinstance(o, Exception))
    return {"method": method, "calls": threads * calls, "wrong": wrong, "raised": raised}


def racing_ratio_row(method: str, calls: int) -> dict:
    model = tokenpatch.patch(small_model(), method, keep_ratio=0.5)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    references = []
    with torch.no_grad():
        for ratio in (0.5, 0.25):
            tokenpatch.set_keep_ratio(model, ratio)
            references.append(model(x))
    stop = threading.Event()

    def toggle() -> None:
        while not stop.is_set():
            for ratio in (0.5, 0.25):
                tokenpatch.set_keep_ratio(model, ratio)
                time.sleep(1e-4)

    toggler = threading.Thread(target=toggle)
    toggler.start()
    try:
        outputs = [o for r in run_threads(lambda i, n: model(x), 2, calls) for o in r]
    finally:
        stop.set()
        toggler.join()
    raised = sum(isinstance(o, Exception) for o in outputs)
    mixed = sum(not any(torch.equal(o, ref) for ref in references) for o in outputs if not isinstance(o, Exception))
    return {"racing_calls": 2 * calls, "racing_mixed": mixed, "racing_raised": raised}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--calls", type=int, default=50, help="forward calls per thread")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [{**shared_model_row(m, args.threads, args.calls), **racing_ratio_row(m, args.calls // 2)}
            for m in sorted(tokenpatch.available_methods())]
    print(f"{args.threads} threads x {args.calls} calls, batch sizes 1-4, tokenpatch {tokenpatch.__version__}")
    print(format_table(rows, ["method", "calls", "wrong", "raised", "racing_calls", "racing_mixed", "racing_raised"]))
    if args.json:
        write_json({"threads": args.threads, "calls_per_thread": args.calls, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
