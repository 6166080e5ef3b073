"""``python -m zoo.infinite_lr.study [--seeds 0 1 2]``: the infinite schedule against repeated cosine on the same task
stream and step budget; writes the per-task linear-probe matrices and the final average accuracy / forgetting
(mean ± std over seeds) to ``zoo/infinite_lr/results.md`` and ``results.json``.

Each seed sets the model's initialisation and masks (``seed_everything``) and the stream's order (``sampler_seed``);
the class split into tasks is the same for every run. Rerunning reads finished runs back.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ARMS = {"infinite (inf-cos, anneal on a copy)": "infinite_lr_cifar10_subset_inf_cos",
        "repeated cosine (re-warm every task)": "infinite_lr_cifar10_subset_repeated_cosine"}
HERE = Path(__file__).resolve().parent


def run(stem: str, seed: int, root: str, tasks: int = 5) -> dict:
    """One run's task matrix; a run whose matrix is complete is read back, not trained again."""
    name = f"{stem}_seed{seed}"
    matrix = Path(root) / name / "task_matrix.json"
    if not (matrix.exists() and len(json.loads(matrix.read_text())["accuracy"]) == tasks):
        command = [sys.executable, "-m", "zoo", "fit", "--config", f"experiments/{stem}.yaml", f"--run.root={root}",
                   f"--run.name={name}", f"--seed_everything={seed}", f"--data.init_args.sampler_seed={seed}",
                   "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false", "--run.resume=false"]
        subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(matrix.read_text())
    # wall time of the fit: from the config the CLI writes at the start to the last matrix
    result["seconds"] = matrix.stat().st_mtime - (Path(root) / name / "config.yaml").stat().st_mtime
    return result


def untrained_reference(seed: int) -> list[float]:
    """Per-task probe accuracy of the randomly initialised encoder (the CPU experiments' MAE): the floor that
    pre-training must beat."""
    import torch
    import yaml

    from zoo.continual.data import TaskStreamDataModule
    from zoo.continual.evaluation import linear_probe_accuracy
    from zoo.infinite_lr.module import MaskedAutoencoder

    config = yaml.safe_load(Path(f"experiments/{ARMS[next(iter(ARMS))]}.yaml").read_text())
    torch.manual_seed(seed)
    network = MaskedAutoencoder(**config["model"]["init_args"]["network"]["init_args"]).eval()
    data = {k: v for k, v in config["data"]["init_args"].items() if k != "num_workers"}
    dm = TaskStreamDataModule(**data, num_workers=0)
    dm.setup("fit")

    def features(task: int, split: str):
        batches = [dm.on_after_batch_transfer(b, 0) for b in dm.task_loader(task, split)]
        with torch.no_grad():
            return torch.cat([network.features(b["image"]) for b in batches]), torch.cat([b["label"] for b in batches])

    return [linear_probe_accuracy(*features(j, "train"), *features(j, "test")) for j in range(dm.num_tasks)]


def matrix_table(runs: list[dict]) -> list[str]:
    """R[i][j] in %, mean over seeds: row = after task i, column = task j (blank above the diagonal)."""
    tasks = len(runs[0]["accuracy"])
    lines = ["| after task | " + " | ".join(f"task {j}" for j in range(tasks)) + " | A_i | F_i |",
             "|---" * (tasks + 3) + "|"]
    for i in range(tasks):
        cells = [f"{100 * np.mean([r['accuracy'][i][j] for r in runs]):.1f}" if j <= i else "" for j in range(tasks)]
        a = 100 * np.mean([r["average_accuracy"][i] for r in runs])
        f = 100 * np.mean([r["forgetting"][i] for r in runs])
        lines.append(f"| {i} | " + " | ".join(cells) + f" | {a:.1f} | {f:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="runs/infinite_lr")
    args = parser.parse_args()
    results = {label: [run(stem, seed, args.root) for seed in args.seeds] for label, stem in ARMS.items()}

    def stat(runs, key, index=-1, scale=100):
        values = [scale * r[key][index] for r in runs]
        return f"{np.mean(values):.1f} ± {np.std(values):.1f}"

    lines = [f"<!-- written by python -m zoo.infinite_lr.study --seeds {' '.join(map(str, args.seeds))} -->",
             f"Offline CIFAR-10 subset in 5 class-incremental tasks of 2 classes, 100 steps per task at batch 64, tiny "
             f"MAE; linear probe per task (within-task classes) on frozen mean-pooled encoder features. Seeds "
             f"{args.seeds}; mean ± std (population std); 2-core shared CPU.", "",
             "| schedule | final avg. probe accuracy A (%) | final forgetting F (pp) | final avg. MAE loss on seen "
             "tasks | minutes / run |", "|---|---|---|---|---|"]
    for label, runs in results.items():
        losses = [np.mean(r["loss"][-1]) for r in runs]
        minutes = np.mean([r["seconds"] for r in runs]) / 60
        lines.append(f"| {label} | {stat(runs, 'average_accuracy')} | {stat(runs, 'forgetting')} | "
                     f"{np.mean(losses):.4f} ± {np.std(losses):.4f} | {minutes:.1f} |")
    floor = [untrained_reference(seed) for seed in args.seeds]
    lines += ["", "Untrained encoder (random initialisation, same probe), per task: "
              + ", ".join(f"{100 * np.mean([f[j] for f in floor]):.1f}" for j in range(len(floor[0])))
              + f"; mean {100 * np.mean(floor):.1f} ± {100 * np.std([np.mean(f) for f in floor]):.1f} %."]
    for label, runs in results.items():
        lines += ["", f"R[i][j] (%), {label}, mean over seeds:", "", *matrix_table(runs)]
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results.md").write_text(text)
    (HERE / "results.json").write_text(json.dumps({"seeds": args.seeds, "runs": results, "untrained": floor},
                                                  indent=1))


if __name__ == "__main__":
    main()
