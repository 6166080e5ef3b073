"""``python -m zoo.hle_plfms.study [--seeds 0 1 2]``: PL-FMS against ER and the fine-only baseline on the HLE
stream of the CIFAR-10 subset; each seed also draws its own stream order (``stream_seed``, as the official
``rand0..2`` collections). Writes the per-level A_AUC / final-accuracy table to ``zoo/hle_plfms/results.md`` and
the per-run numbers to ``results.json``."""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARMS = {"PL-FMS": "hle_plfms_cifar10_subset", "ER": "hle_plfms_cifar10_subset_er",
        "ER, fine labels only": "hle_plfms_cifar10_subset_fine_only"}
METRICS = ("val/aauc_fine", "val/aauc_coarse", "val/acc_fine", "val/acc_coarse", "val/acc_coarse_head")


def run(stem: str, seed: int, root: str) -> dict[str, float]:
    command = [sys.executable, "-m", "zoo", "fit", "--config", f"experiments/{stem}.yaml", f"--run.root={root}",
               f"--run.name={stem}_seed{seed}", f"--seed_everything={seed}", f"--data.init_args.stream_seed={seed}",
               "--trainer.enable_progress_bar=false", "--run.resume=false"]
    cpu_before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    final = out.split("[zoo] final evaluation:")[1].splitlines()  # the CLI prints "  <key>  <value>" lines
    metrics = {key: float(value) for key, value in (line.split() for line in final if line.startswith("  val/"))}
    metrics["cpu_s"] = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    metrics["wall_s"] = time.time() - start
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="/tmp/hle_plfms_study")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {label: [] for label in ARMS}
    for seed in args.seeds:  # seed-major, the table rewritten after each seed: an interrupted study keeps its seeds
        for label, stem in ARMS.items():
            results[label].append(run(stem, seed, args.root))
        write(results, args.seeds[: len(results["PL-FMS"])])


def write(results: dict[str, list[dict]], seeds: list[int]) -> None:
    rows = []
    for label, runs in results.items():
        cells = [f"{100 * np.mean([r[m] for r in runs]):.1f} ± {100 * np.std([r[m] for r in runs]):.1f}"
                 for m in METRICS]
        cpu = np.mean([r["cpu_s"] for r in runs]) / 60
        wall = np.mean([r["wall_s"] for r in runs]) / 60
        rows.append(f"| {label} | {' | '.join(cells)} | {cpu:.1f} / {wall:.1f} |")
    table = [f"HLE stream of the CIFAR-10 subset (animal/vehicle -> 10 classes, 2,000 samples, one pass, 1,000 "
             f"steps), seeds {seeds} (stream order and initialisation), mean ± std over seeds, %", "",
             "| arm | A_AUC fine | A_AUC coarse | final fine | final coarse | final coarse (coarse head only) | "
             "CPU / wall min per run |", "|---|---|---|---|---|---|---|", *rows]
    print("\n".join(table), flush=True)
    folder = Path(__file__).parent
    (folder / "results.md").write_text("\n".join(table) + "\n")
    (folder / "results.json").write_text(json.dumps({"seeds": seeds, "arms": ARMS, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
