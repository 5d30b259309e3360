"""Resident memory of the fine-tuning job's validation passes, read after each pass.

Links N of the shared images into a folder (as ``eval_memory.py``), builds the validation set of
``tokenpatch finetune --val-data`` for the real DeiT-Tiny patched with a method, and prints this
process's resident memory (VmRSS) before, after the unpatched reference pass and after two
scoring passes. Run it under different ``MALLOC_*`` settings of glibc to see the allocator's share:

    python benchmarks/held_out_rss.py 3000 idle
    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/held_out_rss.py 3000 idle
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from eval_memory import linked_folder

from tokenpatch.data import DEIT_TINY_WEIGHTS, image_dataset, input_transform
from tokenpatch.jobs.finetune import held_out
from tokenpatch.jobs.models import PatchRequest, load_model

from shared_data import add_data_option, shared_data


def resident_mb() -> int:
    """This process's resident memory in MB (Linux /proc)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS"))
    return int(line.split()[1]) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=int)
    parser.add_argument("method")
    add_data_option(parser)
    args = parser.parse_args()
    shared = shared_data(parser, args)
    folder = linked_folder(shared, Path(tempfile.mkdtemp()) / "val", args.images)
    loaded = load_model("deit_tiny_patch16_224", str(shared / DEIT_TINY_WEIGHTS))
    model = loaded.patched(PatchRequest(args.method))
    dataset = image_dataset(folder, None, input_transform(loaded.preprocessing), 1000)
    print(f"start: {resident_mb()} MB", flush=True)
    val = held_out(model, dataset, batch_size=32)
    print(f"after the reference pass: {resident_mb()} MB", flush=True)
    for number in (1, 2):
        val.evaluate(model.eval())
        print(f"after scoring pass {number}: {resident_mb()} MB", flush=True)


if __name__ == "__main__":
    main()
