"""``python -m zoo.coact.study [--seeds 0 1 2]``: CoACT against plain fine-tuning and prototype tuning on the USPS
few-shot class-incremental stream, from the MNIST-pre-trained tiny ViT; writes accuracy per session and the
average to ``zoo/coact/results.md`` (+ ``.json``). Trains the foundation first when its checkpoint is missing."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FOUNDATION = Path("runs/coact_foundation_mnist/checkpoints/last.ckpt")
ARMS = {"CoACT": "coact_usps", "plain LoRA fine-tuning (CE only)": "coact_usps_finetune",
        "prototype tuning (frozen, nothing trained)": "coact_usps_prototype"}
DETERMINISTIC = {"coact_usps_prototype"}  # nothing trains: every seed gives the same numbers
SESSIONS = 4


def run(stem: str, seed: int, root: str) -> dict[str, float]:
    command = [sys.executable, "-m", "zoo", "fit", "--config", f"experiments/{stem}.yaml", f"--run.root={root}",
               f"--run.name={stem}_seed{seed}", f"--seed_everything={seed}", "--trainer.enable_progress_bar=false",
               "--run.resume=false"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    final = out.split("[zoo] final evaluation:")[1].splitlines()
    return {key: float(value) for key, value in (line.split() for line in final if line.startswith("  val/"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="/tmp/coact_study")
    args = parser.parse_args()
    if not FOUNDATION.exists():
        subprocess.run([sys.executable, "-m", "zoo", "fit", "--config", "experiments/coact_foundation_mnist.yaml",
                        "--trainer.enable_progress_bar=false"], check=True)
    keys = [f"val/session{s}_acc" for s in range(SESSIONS)] + ["val/avg_acc"]
    rows, raw = [], {}
    for label, stem in ARMS.items():
        seeds = args.seeds[:1] if stem in DETERMINISTIC else args.seeds
        start = time.time()
        results = [run(stem, seed, args.root) for seed in seeds]
        minutes = (time.time() - start) / 60 / len(seeds)
        raw[stem] = {"seeds": seeds, "results": results, "wall_minutes_per_run": minutes}
        cells = [f"{100 * np.mean([r[k] for r in results]):.1f} ± {100 * np.std([r[k] for r in results]):.1f}"
                 for k in keys]
        rows.append(f"| {label} (`{stem}`) | {' | '.join(cells)} | {len(seeds)} | {minutes:.1f} |")
    header = " | ".join(f"session {s}" for s in range(SESSIONS))
    table = ["USPS few-shot class-incremental stream: 4 base classes + 3 sessions x 2 classes, 10 shots per class, "
             "tiny ViT (16x16, 4 blocks, width 96) pre-trained on MNIST; top-1 accuracy (%) on the test images of "
             "the classes seen so far, mean ± std over seeds " + str(args.seeds), "",
             f"| arm | {header} | average | seeds | wall min / run |", "|---|" + "---|" * (SESSIONS + 3), *rows]
    print("\n".join(table))
    here = Path(__file__).parent
    (here / "results.md").write_text("\n".join(table) + "\n")
    (here / "results.json").write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
