"""Each paper's recipe (``tokenpatch finetune --recipe``) for a few hundred images on the CPU.

Runs ``tokenpatch finetune`` on the real DeiT-Tiny and the 500 shared images (80 % train, 20 %
scored before and after) with each recipe, changing only what a CPU run needs: ``--steps``,
``--batch-size`` and ``--accum-steps 1``, and the learning rate the recipe reaches at its official
total batch (``--lr``; without it the recipe would scale it down to the small batch). Prints the
mean loss of the first and last steps, top-1 before and after (and of the moving average of the
weights the recipes keep), and the loop's images/s;
``--json FILE`` also writes them with every step's loss.

    python benchmarks/recipe_steps.py --steps 40 --json benchmarks/results/recipe_steps.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from tokenpatch.data import DEIT_TINY_WEIGHTS, IMAGENET_SAMPLE
from tokenpatch.measure.report import format_table, write_json
from tokenpatch.training.recipes import RECIPES

from shared_data import add_data_option, shared_data


def official_lr(name: str) -> float:
    """The backbone learning rate recipe ``name`` runs at with its official total batch."""
    values = RECIPES[name].values()
    return values["lr"] * values["total_batch"] / values.get("lr_batch", values["total_batch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_option(parser)
    parser.add_argument("--recipes", nargs="+", default=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    shared = shared_data(parser, args)
    rows, curves = [], {}
    for name in args.recipes:
        command = [sys.executable, "-m", "tokenpatch.cli", "finetune", "deit_tiny_patch16_224", "--checkpoint",
                   str(shared / DEIT_TINY_WEIGHTS), "--data", str(shared / IMAGENET_SAMPLE), "--recipe", name,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--accum-steps", "1",
                   "--lr", str(official_lr(name)), "-j", "0", "--json"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout)
        losses = result["losses"]
        window = max(1, len(losses) // 8)
        rows.append({"recipe": name, "method": result["method"], "steps": result["steps"], "lr": official_lr(name),
                     "first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window,
                     "top1_before": result["before"]["top1"], "top1_after": result["after"]["top1"],
                     "ema_top1_after": result.get("after_ema", {}).get("top1"),
                     "loop_img_s": result["loop"]["loop_img_s"]})
        curves[name] = losses
        print(format_table(rows[-1:], digits=3).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(rows, digits=3))
    if args.json:
        write_json({"command": " ".join(sys.argv), "rows": rows, "losses": curves}, args.json)


if __name__ == "__main__":
    main()
