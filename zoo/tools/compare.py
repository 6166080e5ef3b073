"""``python -m zoo.tools.compare --out card.md --seeds 0,1,2 name=experiments/A.yaml name2=experiments/B.yaml``

Trains every experiment with every seed under one protocol (the seed sets the labeled split, the sampler and the
initialisation, identically for all methods, so every method sees the same labeled images), then writes a
Markdown table (mean ± std of the final value of ``--metric``, by default the EMA model's test accuracy, and of
``--secondary``, by default the raw network's) and a PNG of the learning curves of ``--metric``. Other tasks name
their own metrics, e.g. ``--metric val/miou --secondary val/ema_miou`` or ``--metric val/mAP --secondary val/mAP50``. Each run lives in ``runs/compare/<name>_s<seed>``: rerunning the command resumes unfinished runs
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
    """Keeps (step, metrics) of every validation on rank 0, also in ``<run dir>/validation_history.json``, so a run
    that is interrupted and resumed (or only re-evaluated) keeps the learning curve of its earlier part."""

    def __init__(self):
        self.history: list[dict] = []

    def _file(self, trainer) -> Path:
        return Path(trainer.default_root_dir) / "validation_history.json"

    def on_fit_start(self, trainer, pl_module):
        if trainer.is_global_zero and self._file(trainer).exists():
            self.history = json.loads(self._file(trainer).read_text())

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        # a resumed run validates again at the step it stopped at: the newer record replaces the older one
        self.history = [h for h in self.history if h["step"] != trainer.global_step]
        self.history.append({"step": trainer.global_step, **metrics})
        self._file(trainer).write_text(json.dumps(self.history))


def run_one(config: str, seed: int, name: str, root: str, extra: list[str],
            seeded_data_args: tuple[str, ...] = ("split_seed", "sampler_seed")) -> dict:
    from zoo.core.cli import ZooCLI
    from zoo.tools.compare import RecordValidation as Recorder  # the class the CLI built, also under ``python -m``

    start = time.perf_counter()
    seeds = [f"--data.init_args.{arg}={seed}" for arg in seeded_data_args]
    cli = ZooCLI(args=["fit", "--config", config, f"--seed_everything={seed}", *seeds, f"--run.name={name}_s{seed}",
                       f"--run.root={root}", "--trainer.enable_progress_bar=false", *extra])
    recorder = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Recorder))
    final = recorder.history[-1] if recorder.history else {}
    return {"name": name, "seed": seed, "final": final, "history": recorder.history,
            "seconds": time.perf_counter() - start}


def summarise(results: list[dict], metric: str) -> dict[str, tuple[float, float, int]]:
    table = {}
    for name in dict.fromkeys(r["name"] for r in results):
        values = [r["final"][metric] for r in results if r["name"] == name and metric in r["final"]]
        table[name] = (float(np.mean(values)), float(np.std(values)), len(values))
    return table


def write_card(results: list[dict], out: Path, seeds: list[int], experiments: dict[str, str],
               metric: str = "val/ema_acc", secondary: str = "val/acc", scale: float = 100.0,
               lower_is_better: bool = False) -> None:
    main = summarise(results, metric)
    other = summarise(results, secondary)
    minutes = {n: np.mean([r["seconds"] for r in results if r["name"] == n]) / 60 for n in main}
    unit = " (%)" if scale == 100 else ""
    lines = [f"| method | {metric}{unit}, mean ± std | {secondary}{unit} | seeds | minutes/run |", "|---|---|---|---|---|"]
    for name, (mean, std, n) in sorted(main.items(), key=lambda kv: kv[1][0] if lower_is_better else -kv[1][0]):
        o_mean, o_std, _ = other.get(name, (float("nan"), float("nan"), 0))
        lines.append(f"| {name} | {scale * mean:.2f} ± {scale * std:.2f} | {scale * o_mean:.2f} ± {scale * o_std:.2f} | "
                     f"{n} | {minutes[name]:.1f} |")
    plot = out.with_suffix(".png")
    _plot(results, plot, metric, scale)
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    body = "\n".join(lines)
    commands = "\n".join(f"- `{n}`: `experiments/{Path(c).name}`" for n, c in experiments.items())
    out.write_text(f"<!-- written by python -m zoo.tools.compare -->\nSeeds {seeds} (each seed: labeled split, "
                   f"sampler and initialisation, shared by all methods). Hardware: {cpu}.\n\n{body}\n\n"
                   f"![learning curves]({plot.name})\n\nExperiments:\n{commands}\n")
    (out.with_suffix(".json")).write_text(json.dumps(results, indent=1))
    print(body)


def _plot(results: list[dict], path: Path, metric: str, scale: float = 100.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(dict.fromkeys(r["name"] for r in results)):
        runs = [r["history"] for r in results if r["name"] == name and r["history"]]
        if not runs:
            continue
        runs = [h for h in runs if len(h) == max(map(len, runs))]  # a run whose early curve was lost stays out
        steps = [h["step"] for h in runs[0]]
        curves = np.array([[h.get(metric, np.nan) for h in run[: len(steps)]] for run in runs])
        mean = np.nanmean(curves, 0)
        ax.plot(steps, scale * mean, label=name, color=f"C{i}")
        if len(runs) > 1:
            ax.fill_between(steps, scale * np.nanmin(curves, 0), scale * np.nanmax(curves, 0), color=f"C{i}", alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} (%)" if scale == 100 else metric)
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
    parser.add_argument("--seeded-data-args", default="split_seed,sampler_seed",
                        help="data-module arguments set to the seed (comma-separated; e.g. sampler_seed when the "
                             "split is fixed)")
    parser.add_argument("--metric", default="val/ema_acc", help="the metric the table ranks by and the plot shows")
    parser.add_argument("--secondary", default="val/acc", help="a second metric reported beside it")
    parser.add_argument("--scale", type=float, default=100.0, help="multiplies the metric in the table (100: percent)")
    parser.add_argument("--lower-is-better", action="store_true", help="rank ascending (distances such as FD)")
    args, extra = parser.parse_known_args(argv)
    experiments = dict(e.split("=", 1) for e in args.experiments)
    extra = ["--trainer.callbacks+=zoo.tools.compare.RecordValidation", *extra]
    seeded = tuple(a for a in args.seeded_data_args.split(",") if a)
    results = [run_one(config, seed, name, args.root, extra, seeded)
               for seed in args.seeds for name, config in experiments.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_card(results, args.out, args.seeds, experiments, args.metric, args.secondary, args.scale,
               args.lower_is_better)


if __name__ == "__main__":
    main()
