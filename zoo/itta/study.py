"""``python -m zoo.itta.study [--seeds 0 1 2] [--test-domain sketch]``: ITTA against ERM and ERM + Tent on the offline
PACS subset, one held-out domain; writes the table to ``zoo/itta/results.md`` (+ ``results.json``).

Each ERM run gives two rows (the same trained network without and with Tent at test time) and each ITTA run two
(without and with its test-time step): ``val/acc`` / ``val/tta_acc`` at the last step, and ``val/selected_acc`` /
``val/selected_tta_acc`` at the evaluation with the best training-domain validation accuracy (DomainBed's model
selection).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARMS = {"ERM": "itta_pacs_small_erm", "ITTA": "itta_pacs_small"}
ROWS = {  # row label -> (arm, metric at the last step, metric at the selected evaluation)
    "ERM": ("ERM", "val/acc", "val/selected_acc"),
    "ERM + Tent": ("ERM", "val/tta_acc", "val/selected_tta_acc"),
    "ITTA without its test-time step": ("ITTA", "val/acc", "val/selected_acc"),
    "ITTA": ("ITTA", "val/tta_acc", "val/selected_tta_acc"),
}


def run(stem: str, seed: int, test_domain: str, root: str) -> dict[str, float]:
    command = [sys.executable, "-m", "zoo", "fit", "--config", f"experiments/{stem}.yaml", f"--run.root={root}",
               f"--run.name={stem}_{test_domain}_seed{seed}", f"--seed_everything={seed}",
               f"--data.init_args.test_domain={test_domain}", "--trainer.enable_progress_bar=false",
               "--run.resume=false"]
    start = time.time()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    final = out.split("[zoo] final evaluation:")[1].splitlines()  # the CLI prints "  <key>  <value>" lines
    metrics = {key: float(value) for key, value in (line.split() for line in final if line.startswith("  val/"))}
    return {**metrics, "minutes": (time.time() - start) / 60}


def cell(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-domain", default="sketch")
    parser.add_argument("--root", default="/tmp/itta_study")
    args = parser.parse_args()
    results = {arm: [run(stem, seed, args.test_domain, args.root) for seed in args.seeds]
               for arm, stem in ARMS.items()}
    lines = [f"PACS offline subset (64 px), held-out {args.test_domain}, seeds {args.seeds}: held-out-domain accuracy "
             "(%, mean ± std over seeds)", "",
             "| method | last step | selected (training-domain validation) | minutes / run |", "|---|---|---|---|"]
    for label, (arm, last, selected) in ROWS.items():
        runs = results[arm]
        lines.append(f"| {label} | {cell([r[last] for r in runs])} | {cell([r[selected] for r in runs])} | "
                     f"{np.mean([r['minutes'] for r in runs]):.1f} |")
    print("\n".join(lines))
    here = Path(__file__).parent
    (here / "results.md").write_text("\n".join(lines) + "\n")
    (here / "results.json").write_text(json.dumps({"seeds": args.seeds, "test_domain": args.test_domain,
                                                   "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
