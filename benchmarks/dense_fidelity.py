"""Dense-output fidelity: how close a patched model's full-grid features are to the unpatched ones.

    python benchmarks/dense_fidelity.py --data ../shared/data --json benchmarks/results/dense_fidelity.json

On the real DeiT-Tiny and the shared images, every method (defaults) is fitted to the same share
of the unpatched MACs (``--macs-ratio``, fvcore) and its dense outputs are compared patch by
patch with the unpatched model's: cosine similarity of ``forward_features`` (after the final
norm) and of ``forward_intermediates`` at a few blocks (before the norm), over every patch of
every image. ``final_p05`` is the 5th percentile over patches of the final similarity. The
learned methods (dynamicvit, iared2) run with untrained, seeded predictors. Dropped
tokens come back as they left; merged ones as the token they were merged into. All numbers
come from this run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokenpatch
from tokenpatch.measure.budget import mean_macs_per_image
from tokenpatch.measure.flops import count_macs

from real_data import add_real_data_flags, load_real_data, report, show_row

BLOCKS = (3, 6, 9)


def dense_outputs(model: nn.Module, images: Tensor, batch_size: int = 50) -> tuple[Tensor, list[Tensor]]:
    """(B, N - 1, C) final patch features and, per block of ``BLOCKS``, (B, N - 1, C) intermediates."""
    finals, intermediates = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            final, taken = model.forward_intermediates(batch, indices=list(BLOCKS), output_fmt="NLC")
            finals.append(final[:, model.num_prefix_tokens:])
            intermediates.append(taken)
    return torch.cat(finals), [torch.cat([t[i] for t in intermediates]) for i in range(len(BLOCKS))]


def similarity(a: Tensor, b: Tensor) -> Tensor:
    """Per-patch cosine similarity, flattened: (B, M, C) x 2 -> (B * M,)."""
    return F.cosine_similarity(a, b, dim=-1).flatten()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_real_data_flags(parser)
    parser.add_argument("--macs-ratio", type=float, default=0.65)
    parser.add_argument("--methods", nargs="+", help="methods to run (default: every registered one)")
    args = parser.parse_args(argv)

    model, images, _ = load_real_data(parser, args)
    torch.manual_seed(0)  # the untrained predictors/interpreters of the learned methods
    probe = images[:16]
    final_ref, intermediates_ref = dense_outputs(model, images)
    base_macs = count_macs(model).total
    rows, started = [], time.time()
    for method in args.methods or sorted(tokenpatch.available_methods()):
        tokenpatch.patch(model, method, macs_ratio=args.macs_ratio, macs_input=probe)
        final, intermediates = dense_outputs(model, images)
        final_cos = similarity(final, final_ref)
        row = dict(method=method, keep_ratio=tokenpatch.get_config(model).keep_ratio,
                   macs_ratio=mean_macs_per_image(model, probe) / base_macs,
                   final=final_cos.mean().item(), final_p05=final_cos.quantile(0.05).item())
        for block, ours, theirs in zip(BLOCKS, intermediates, intermediates_ref):
            row[f"block_{block}"] = similarity(ours, theirs).mean().item()
        rows.append(row)
        show_row(rows)
        tokenpatch.unpatch(model)
    report(f"DeiT-Tiny, {len(images)} images, per-patch cosine similarity to the unpatched model, "
           f"{time.time() - started:.0f} s", rows, args, images=len(images), macs_ratio=args.macs_ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
