"""``python -m zoo.rankme.study``: does RankMe rank checkpoints of one SSL method as linear-probe accuracy does?

    # train SimCLR at 8 temperatures (checkpoints every 100 steps), then evaluate every checkpoint
    python -m zoo.rankme.study --config experiments/rankme_simclr_cifar10_subset.yaml \\
        --grid model.init_args.temperature=0.05,0.1,0.2,0.3,0.5,0.7,1.0,2.0 --out runs/rankme
    # or evaluate checkpoints that exist (each run's config.yaml beside its checkpoints/ folder)
    python -m zoo.rankme.study --checkpoints runs/a/study_checkpoints/*.ckpt runs/b/study_checkpoints/*.ckpt

Per checkpoint, from the ssl family's cached feature banks (``zoo.ssl.bank``; one pass over the images gives both
layers):
- RankMe of the **embeddings** (the projector output the SSL loss compares, the paper's ``Z``) on the test split
  (the family's fixed held-out set, ``val/rankme``), and of the backbone representation for comparison;
- linear-probe accuracy on the backbone (L-BFGS logistic regression on standardised features, trained on the whole
  train split, tested on the test split) and weighted-kNN accuracy.

Across all points: Spearman's rho and Kendall's tau (scipy, with p-values) between RankMe and probe accuracy. The
hyper-parameter selection the paper evaluates: among the final checkpoints of the settings, the one with the highest
RankMe against the one with the highest probe accuracy (the label oracle); the gap is their accuracy difference.
Writes ``<out>/rankme_study.{json,md,png}``; rerunning skips trained runs and cached banks.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np

from zoo.ssl.bank import feature_banks, knn_accuracy, linear_probe, rankme_of

__all__ = ["expand_grid", "train_setting", "evaluate_checkpoint", "rank_correlations", "selection_gap", "analyse",
           "write_report", "main"]


# ----------------------------------------------------------------------------------------------- the runs
def expand_grid(grid: list[str]) -> list[dict]:
    """``["model.init_args.temperature=0.1,0.5", "model.init_args.lr=0.03,0.06"]`` -> every combination, each as
    ``{"name": "temperature=0.1_lr=0.03", "overrides": ["--model.init_args.temperature=0.1", ...],
    "values": {...}}``."""
    axes = []
    for entry in grid:
        key, sep, values = entry.partition("=")
        if not sep or not values:
            raise ValueError(f"grid entry {entry!r} is not KEY=V1,V2,...")
        axes.append([(key, value) for value in values.split(",")])
    settings = []
    for combination in itertools.product(*axes):
        name = "_".join(f"{key.split('.')[-1]}={value}" for key, value in combination) or "default"
        settings.append({"name": name, "overrides": [f"--{key}={value}" for key, value in combination],
                         "values": {key: value for key, value in combination}})
    return settings


def _step_of(checkpoint: Path) -> int:
    match = re.search(r"step=(\d+)", checkpoint.name)
    if match:
        return int(match.group(1))
    import torch

    return int(torch.load(checkpoint, map_location="cpu", weights_only=False).get("global_step", -1))


def train_setting(config: str, setting: dict, run_root: Path, max_steps: int | None = None,
                  extra: list[str] = ()) -> list[Path]:
    """Train one setting through the zoo's CLI (``runs/<name>/``; resumed from ``last.ckpt`` if interrupted, skipped
    when its last study checkpoint exists) and return its study checkpoints, in step order."""
    from zoo.core.cli import ZooCLI
    from zoo.ssl.bank import read_config

    from .callbacks import StudyCheckpoints

    run_dir = run_root / setting["name"]
    steps = max_steps or int(setting["values"].get("trainer.max_steps") or read_config(config)["trainer"]["max_steps"])
    final = run_dir / "study_checkpoints" / f"step={steps:06d}.ckpt"
    if final.exists():  # trained: no need to build the run again
        return sorted((run_dir / "study_checkpoints").glob("step=*.ckpt"), key=_step_of)
    args = ["--config", config, f"--run.root={run_root}", f"--run.name={setting['name']}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",  # the study evaluates offline
            *setting["overrides"], *extra]
    if max_steps is not None:
        args.append(f"--trainer.max_steps={max_steps}")
    cli = ZooCLI(args=args, run=False)
    keepers = [c for c in cli.trainer.callbacks if isinstance(c, StudyCheckpoints)]
    if not keepers:
        raise ValueError(f"{config} keeps no study checkpoints: add zoo.rankme.callbacks.StudyCheckpoints to "
                         "trainer.callbacks")
    if cli.trainer.max_steps != steps:
        raise ValueError(f"expected {steps} steps for {setting['name']}, the trainer has {cli.trainer.max_steps}")
    last = run_dir / "checkpoints" / "last.ckpt"
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last) if last.exists() else None)
    (run_dir / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    if not final.exists():  # the last step is not a multiple of every_n_steps: keep it too
        cli.trainer.save_checkpoint(final)
    return sorted((run_dir / "study_checkpoints").glob("step=*.ckpt"), key=_step_of)


# ----------------------------------------------------------------------------------------- the measurements
def evaluate_checkpoint(checkpoint: Path, dataset: str, device: str = "cpu", probe_C: float = 1.0,
                        rankme_samples: int = 25600, log=print) -> dict:
    """RankMe (embeddings and backbone, test split), linear-probe and kNN accuracy (backbone) of one checkpoint."""
    start = time.perf_counter()
    banks = feature_banks(dataset, checkpoint=checkpoint, layers=("backbone", "projector"), device=device, log=log)
    backbone, embedding = banks["backbone"], banks["projector"]
    point = {"checkpoint": str(checkpoint), "step": _step_of(checkpoint),
             "rankme": rankme_of(embedding, "test", rankme_samples),
             "rankme_backbone": rankme_of(backbone, "test", rankme_samples),
             "linear_acc": linear_probe(backbone, probe_C)["accuracy"], "knn_acc": knn_accuracy(backbone),
             "embedding_dim": embedding.dim, "backbone_dim": backbone.dim}
    point["eval_seconds"] = round(time.perf_counter() - start, 1)
    return point


def rank_correlations(points: list[dict], x: str = "rankme", y: str = "linear_acc") -> dict:
    """Spearman's rho and Kendall's tau (tau-b) between ``x`` and ``y`` over the points, with their p-values."""
    from scipy import stats

    xs, ys = np.array([p[x] for p in points]), np.array([p[y] for p in points])
    rho, rho_p = stats.spearmanr(xs, ys)
    tau, tau_p = stats.kendalltau(xs, ys)
    return {"x": x, "y": y, "points": len(points), "spearman": float(rho), "spearman_p": float(rho_p),
            "kendall": float(tau), "kendall_p": float(tau_p)}


def selection_gap(points: list[dict], criterion: str = "rankme", target: str = "linear_acc") -> dict:
    """The point with the highest ``criterion`` (no labels) against the label oracle, the highest ``target``. Ties in
    the criterion go to the first point, as ``argmax`` does (the paper's tie rule, the extreme hyper-parameter value
    among tied ranks, does not arise with a continuous RankMe)."""
    chosen = max(points, key=lambda p: p[criterion])
    oracle = max(points, key=lambda p: p[target])
    return {"criterion": criterion, "target": target, "selected": chosen.get("setting", chosen["checkpoint"]),
            "selected_accuracy": chosen[target], "oracle": oracle.get("setting", oracle["checkpoint"]),
            "oracle_accuracy": oracle[target], "gap": oracle[target] - chosen[target],
            "candidates": len(points)}


def analyse(points: list[dict]) -> dict:
    """Correlations over every point; the selection among the final checkpoint of each setting (the paper's
    hyper-parameter selection) and among every point (checkpoint and setting)."""
    final = {}
    for p in points:
        key = p.get("setting", p["checkpoint"])
        if key not in final or p["step"] > final[key]["step"]:
            final[key] = p
    finals = list(final.values())
    return {"correlation": rank_correlations(points),
            "correlation_backbone_rankme": rank_correlations(points, "rankme_backbone"),
            "correlation_knn": rank_correlations(points, y="knn_acc") if all("knn_acc" in p for p in points) else None,
            "correlation_final": rank_correlations(finals) if len(finals) > 2 else None,
            "selection_final": selection_gap(finals),
            "selection_all": selection_gap(points),
            "selection_final_by_backbone_rankme": selection_gap(finals, "rankme_backbone")}


def write_report(points: list[dict], analysis: dict, out: Path, header: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f"rankme_study.{k}" for k in ("json", "md", "png")}
    paths["json"].write_text(json.dumps({**header, "analysis": analysis, "points": points}, indent=1))
    c, s = analysis["correlation"], analysis["selection_final"]
    lines = ["| setting | step | RankMe (embedding) | RankMe (backbone) | linear probe acc (%) | kNN acc (%) |",
             "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p.get("setting", ""), p["step"])):
        lines.append(f"| {p.get('setting', Path(p['checkpoint']).parent.parent.name)} | {p['step']} | "
                     f"{p['rankme']:.2f} | {p['rankme_backbone']:.2f} | {100 * p['linear_acc']:.2f} | "
                     f"{100 * p['knn_acc']:.2f} |")
    lines += ["", f"Over {c['points']} checkpoints, RankMe (embedding) vs linear-probe accuracy: Spearman "
              f"{c['spearman']:.3f} (p = {c['spearman_p']:.2g}), Kendall {c['kendall']:.3f} "
              f"(p = {c['kendall_p']:.2g}).", ""]
    b = analysis["correlation_backbone_rankme"]
    lines += [f"RankMe of the backbone instead: Spearman {b['spearman']:.3f}, Kendall {b['kendall']:.3f}.", ""]
    if analysis.get("correlation_knn"):
        k = analysis["correlation_knn"]
        lines += [f"RankMe (embedding) vs kNN accuracy: Spearman {k['spearman']:.3f}, Kendall {k['kendall']:.3f}.", ""]
    if analysis["correlation_final"]:
        f = analysis["correlation_final"]
        lines += [f"Final checkpoints only ({f['points']}): Spearman {f['spearman']:.3f}, Kendall {f['kendall']:.3f}.",
                  ""]
    for name, sel in (("the final checkpoint of each setting", s), ("every checkpoint", analysis["selection_all"])):
        lines.append(f"Selection among {name} ({sel['candidates']}): RankMe picks {sel['selected']} "
                     f"({100 * sel['selected_accuracy']:.2f} %), the label oracle {sel['oracle']} "
                     f"({100 * sel['oracle_accuracy']:.2f} %): gap {100 * sel['gap']:.2f} points.")
    paths["md"].write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    settings = sorted({p.get("setting", "") for p in points})
    for i, setting in enumerate(settings):
        mine = sorted((p for p in points if p.get("setting", "") == setting), key=lambda p: p["step"])
        ax.plot([p["rankme"] for p in mine], [100 * p["linear_acc"] for p in mine], marker="o", label=setting or None,
                color=plt.cm.viridis(i / max(1, len(settings) - 1)))
    ax.set_xlabel("RankMe of the embeddings (test split)")
    ax.set_ylabel("linear-probe accuracy (%)")
    ax.set_title(f"Spearman {c['spearman']:.2f}, Kendall {c['kendall']:.2f} ({c['points']} checkpoints)", fontsize=9)
    ax.grid(alpha=0.3)
    if any(settings):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=120)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ command
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="RankMe vs linear-probe accuracy across checkpoints of one SSL "
                                                 "method, and RankMe's hyper-parameter selection gap.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the experiment to train at each grid setting")
    source.add_argument("--checkpoints", nargs="+", help="evaluate these checkpoints instead of training")
    parser.add_argument("--grid", nargs="*", default=[], help="KEY=V1,V2,... (cartesian product)")
    parser.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps")
    parser.add_argument("--dataset", default=None, help="image set of the banks (default: the config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the linear probe")
    parser.add_argument("--out", default="runs/rankme_study")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further CLI overrides for training")
    args = parser.parse_args(argv)

    out = Path(args.out)
    start = time.perf_counter()
    planned: list[tuple[str, Path]] = []
    train_seconds = {}
    if args.config:
        from zoo.ssl.bank import read_config

        dataset = args.dataset or read_config(args.config)["data"]["init_args"]["dataset"]
        for setting in expand_grid(args.grid):
            checkpoints = train_setting(args.config, setting, out / "runs", args.max_steps, args.extra)
            recorded = out / "runs" / setting["name"] / "train_seconds.txt"  # written when it trained (maybe earlier)
            train_seconds[setting["name"]] = float(recorded.read_text()) if recorded.exists() else None
            planned += [(setting["name"], c) for c in checkpoints]
    else:
        if not args.dataset:
            parser.error("--checkpoints needs --dataset")
        dataset = args.dataset
        planned = [(Path(c).parent.parent.name, Path(c)) for c in args.checkpoints]
    trained = time.perf_counter()
    points = []
    for setting, checkpoint in planned:
        point = {"setting": setting, **evaluate_checkpoint(checkpoint, dataset, args.device, args.C)}
        print(f"[rankme] {setting} step {point['step']}: RankMe {point['rankme']:.2f} "
              f"(backbone {point['rankme_backbone']:.2f}), probe {100 * point['linear_acc']:.2f} %, "
              f"kNN {100 * point['knn_acc']:.2f} %", flush=True)
        points.append(point)
    if len(points) < 3:
        raise SystemExit(f"{len(points)} checkpoints: a rank correlation needs at least 3 (the study asks for >= 8)")
    analysis = analyse(points)
    header = {"config": args.config, "grid": args.grid, "dataset": dataset, "train_seconds": train_seconds,
              "wall_seconds_this_call": {"train": round(trained - start, 1),
                                         "evaluate": round(time.perf_counter() - trained, 1)}}
    paths = write_report(points, analysis, out, header)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"points": points, "analysis": analysis, "paths": paths}


if __name__ == "__main__":
    main()
