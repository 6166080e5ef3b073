"""``python -m zoo.weak_to_strong.pgr``: the weak-to-strong experiment and its performance gap recovered (PGR).

Per seed (the seed also draws the data split, as ``train_simple.py`` does):
1. weak supervisor: ``--weak`` config on half 1 with ground truth; its softmax on half 2 is saved as the weak labels;
2. strong ceiling: ``--strong`` config on half 1 with ground truth;
3. weak-to-strong: the ``--strong`` config on half 2 with the weak labels, once per ``--losses`` entry.
Then PGR = (acc_w2s - acc_weak) / (acc_ceiling - acc_weak), all accuracies on the same ground-truth test docs.
Writes ``<out>/pgr.md`` (a markdown table) and ``<out>/pgr.json``.

    python -m zoo.weak_to_strong.pgr --weak experiments/weak_to_strong_ag_news_weak.yaml \\
        --strong experiments/weak_to_strong_ag_news_strong.yaml --seeds 0 1 --losses xent logconf --out runs/w2s
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["fit_and_evaluate", "save_weak_labels", "performance_gap_recovered", "run", "main"]


def performance_gap_recovered(acc_weak: float, acc_w2s: float, acc_ceiling: float) -> float:
    """NaN when the ceiling does not beat the weak model: there is no gap to recover."""
    gap = acc_ceiling - acc_weak
    return (acc_w2s - acc_weak) / gap if gap else float("nan")


def fit_and_evaluate(config: str, run_root: Path, name: str, seed: int, extra: list[str]):
    """One training run through the zoo's CLI; returns (its CLI object, ground-truth test accuracy)."""
    from zoo.core.cli import ZooCLI

    cli = ZooCLI(args=["--config", config, f"--run.root={run_root}", f"--run.name={name}", "--run.resume=false",
                       f"--seed_everything={seed}", f"--data.init_args.seed={seed}", *extra], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    accuracy = float(cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/acc"])
    print(f"[pgr] {name}: test accuracy {accuracy:.4f}", flush=True)
    return cli, accuracy


def save_weak_labels(cli, path: Path) -> torch.Tensor:
    """The trained weak model's soft predictions on half 2, in half-2 order."""
    outputs = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    idx = torch.cat([o["idx"] for o in outputs])
    probs = torch.cat([o["probs"] for o in outputs])
    soft = torch.empty_like(probs)
    soft[idx] = probs
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(soft, path)
    return soft


def run(weak: str, strong: str, seeds: list[int], losses: list[str], out: Path, extra: list[str] = ()) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"weak_config": weak, "strong_config": strong, "seeds": {}}
    for seed in seeds:
        start = time.time()
        row = {}
        cli, row["weak"] = fit_and_evaluate(weak, out, f"seed{seed}_weak", seed, list(extra))
        labels_path = out / f"seed{seed}_weak" / "weak_labels.pt"
        soft = save_weak_labels(cli, labels_path)
        half2_truth = torch.as_tensor(cli.datamodule.half2_inputs.labels)
        row["weak_label_acc"] = float((soft.argmax(-1) == half2_truth).float().mean())
        _, row["ceiling"] = fit_and_evaluate(strong, out, f"seed{seed}_ceiling", seed, list(extra))
        for loss in losses:
            _, row[f"w2s_{loss}"] = fit_and_evaluate(
                strong, out, f"seed{seed}_w2s_{loss}", seed,
                ["--data.init_args.split=half2", f"--data.init_args.weak_labels={labels_path}",
                 f"--model.init_args.loss={loss}", *extra])
            row[f"pgr_{loss}"] = performance_gap_recovered(row["weak"], row[f"w2s_{loss}"], row["ceiling"])
        row["seconds"] = time.time() - start
        results["seeds"][seed] = row
        results["table"] = table(results, losses)
        (out / "pgr.json").write_text(json.dumps(results, indent=2))  # after every seed, so a long sweep keeps its rows
        (out / "pgr.md").write_text(results["table"] + "\n")
    return results


def table(results: dict, losses: list[str]) -> str:
    columns = ["weak", "weak_label_acc", "ceiling"] + [f"w2s_{l}" for l in losses] + [f"pgr_{l}" for l in losses]
    lines = ["| seed | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows = results["seeds"]
    for seed, row in rows.items():
        lines.append(f"| {seed} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
    if len(rows) > 1:
        mean = {c: np.mean([r[c] for r in rows.values()]) for c in columns}
        std = {c: np.std([r[c] for r in rows.values()]) for c in columns}
        lines.append("| mean ± std | " + " | ".join(f"{mean[c]:.4f} ± {std[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weak", required=True, help="experiment file of the weak supervisor")
    parser.add_argument("--strong", required=True, help="experiment file of the strong model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--losses", nargs="+", default=["xent", "logconf"], choices=["xent", "logconf", "product"])
    parser.add_argument("--out", default="runs/weak_to_strong_pgr")
    parser.add_argument("--args", default="", help='extra CLI overrides for every run, e.g. "--trainer.max_steps=10"')
    ns = parser.parse_args(argv)
    results = run(ns.weak, ns.strong, ns.seeds, ns.losses, Path(ns.out), shlex.split(ns.args))
    print(results["table"])


if __name__ == "__main__":
    main()
