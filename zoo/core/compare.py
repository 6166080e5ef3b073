"""``python -m zoo.core.compare --out card.md --seeds 0,1,2 name=experiments/A.yaml name2=experiments/B.yaml``

Trains every experiment with every seed under one protocol (the seed sets the labeled split, the sampler and the
initialisation, identically for all methods, so every method sees the same labeled images), then writes a
Markdown table (mean ± std of the final test accuracy of the EMA model and of the raw network) and a PNG of the
learning curves. Each run lives in ``runs/compare/<name>_s<seed>``: rerunning the command resumes unfinished runs
and only re-evaluates finished ones.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback


class RecordValidation(Callback):
    """Keeps (step, metrics) of every validation on rank 0."""

    def __init__(self):
        self.history: list[dict] = []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.history.append({"step": trainer.global_step, **metrics})


def run_one(config: str, seed: int, name: str, root: str, extra: list[str]) -> dict:
    from .cli import ZooCLI

    start = time.perf_counter()
    cli = ZooCLI(args=["fit", "--config", config, f"--seed_everything={seed}", f"--data.init_args.split_seed={seed}",
                       f"--data.init_args.sampler_seed={seed}", f"--run.name={name}_s{seed}", f"--run.root={root}",
                       "--trainer.enable_progress_bar=false", *extra])
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, RecordValidation))
    final = recorder.history[-1] if recorder.history else {}
    return {"name": name, "seed": seed, "final": final, "history": recorder.history[:-1] or recorder.history,
            "seconds": time.perf_counter() - start}


def summarise(results: list[dict], metric: str) -> dict[str, tuple[float, float, int]]:
    table = {}
    for name in dict.fromkeys(r["name"] for r in results):
        values = [r["final"][metric] for r in results if r["name"] == name and metric in r["final"]]
        table[name] = (float(np.mean(values)), float(np.std(values)), len(values))
    return table


def write_card(results: list[dict], out: Path, seeds: list[int], experiments: dict[str, str]) -> None:
    ema = summarise(results, "val/ema_acc")
    raw = summarise(results, "val/acc")
    minutes = {n: np.mean([r["seconds"] for r in results if r["name"] == n]) / 60 for n in ema}
    lines = [f"| method | EMA test accuracy (mean ± std) | network test accuracy | seeds | minutes/run |",
             "|---|---|---|---|---|"]
    for name, (mean, std, n) in sorted(ema.items(), key=lambda kv: -kv[1][0]):
        r_mean, r_std, _ = raw.get(name, (float("nan"), float("nan"), 0))
        lines.append(f"| {name} | {100 * mean:.2f} ± {100 * std:.2f} | {100 * r_mean:.2f} ± {100 * r_std:.2f} | "
                     f"{n} | {minutes[name]:.1f} |")
    plot = out.with_suffix(".png")
    _plot(results, plot)
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    body = "\n".join(lines)
    commands = "\n".join(f"- `{n}`: `experiments/{Path(c).name}`" for n, c in experiments.items())
    out.write_text(f"<!-- written by python -m zoo.core.compare -->\nSeeds {seeds} (each seed: labeled split, "
                   f"sampler and initialisation, shared by all methods). Hardware: {cpu}.\n\n{body}\n\n"
                   f"![learning curves]({plot.name})\n\nExperiments:\n{commands}\n")
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(body)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(dict.fromkeys(r["name"] for r in results)):
        runs = [r["history"] for r in results if r["name"] == name and r["history"]]
        if not runs:
            continue
        steps = [h["step"] for h in runs[0]]
        curves = np.array([[h.get("val/ema_acc", np.nan) for h in run[: len(steps)]] for run in runs])
        mean = np.nanmean(curves, 0)
        ax.plot(steps, 100 * mean, label=name, color=f"C{i}")
        if len(runs) > 1:
            ax.fill_between(steps, 100 * np.nanmin(curves, 0), 100 * np.nanmax(curves, 0), color=f"C{i}", alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("EMA test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="name=experiments/X.yaml")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2],
                        help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--root", default="runs/compare")
    args, extra = parser.parse_known_args(argv)
    experiments = dict(e.split("=", 1) for e in args.experiments)
    extra = ["--trainer.callbacks+=zoo.core.compare.RecordValidation", *extra]
    results = [run_one(config, seed, name, args.root, extra)
               for seed in args.seeds for name, config in experiments.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_card(results, args.out, args.seeds, experiments)


if __name__ == "__main__":
    main()
