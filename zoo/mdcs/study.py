"""``python -m zoo.mdcs.study [--seeds 0 1 2] [--imbalance-ratio 100]``: MDCS against its two baselines on the
long-tailed CIFAR-10 subset; writes the overall / many / medium / few-shot table to ``zoo/mdcs/results.md``."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARMS = {"MDCS (3 experts)": "mdcs_cifar10_subset_ir100", "single expert, CE": "mdcs_cifar10_subset_ir100_ce",
        "single expert, logit-adjusted CE": "mdcs_cifar10_subset_ir100_la"}
METRICS = ("val/acc", "val/many_acc", "val/medium_acc", "val/few_acc")


def run(stem: str, seed: int, ratio: float, root: str) -> dict[str, float]:
    name = f"{stem}_ratio{ratio:g}_seed{seed}"
    command = [sys.executable, "-m", "zoo", "fit", "--config", f"experiments/{stem}.yaml", f"--run.root={root}",
               f"--run.name={name}", f"--seed_everything={seed}", f"--data.init_args.imbalance_ratio={ratio}",
               "--trainer.enable_progress_bar=false", "--run.resume=false"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    final = out.split("[zoo] final evaluation:")[1].splitlines()  # the CLI prints "  <key>  <value>" lines
    return {key: float(value) for key, value in (line.split() for line in final if line.startswith("  val/"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--imbalance-ratio", type=float, default=100.0)
    parser.add_argument("--root", default="/tmp/mdcs_study")
    args = parser.parse_args()
    rows = []
    for label, stem in ARMS.items():
        start = time.time()
        results = [run(stem, seed, args.imbalance_ratio, args.root) for seed in args.seeds]
        cells = [f"{100 * np.mean([r[m] for r in results]):.1f} ± {100 * np.std([r[m] for r in results]):.1f}"
                 for m in METRICS]
        rows.append(f"| {label} | {' | '.join(cells)} | {(time.time() - start) / len(args.seeds):.0f} s |")
    table = [f"Long-tailed CIFAR-10 subset, IR {args.imbalance_ratio:g}, seeds {args.seeds} (mean ± std, %)", "",
             "| arm | overall | many | medium | few | wall / run |", "|---|---|---|---|---|---|", *rows]
    print("\n".join(table))
    Path(__file__).with_name("results.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
