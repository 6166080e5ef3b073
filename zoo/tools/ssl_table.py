"""``python -m zoo.tools.ssl_table --out docs/results/ssl_representations --seeds 0,1,2 name=experiments/A.yaml ...``

The self-supervised family's comparison: every method trains under one protocol (its experiment file, moved to
each ``--datasets`` entry by the overlay ``experiments/protocols/ssl_<dataset>.yaml``; none for the dataset the
files are written for), with every seed, through ``zoo.tools.compare.run_one`` (same seeds, same sampler order,
resumable runs under ``--root``). Each final checkpoint is then evaluated on its frozen backbone by the family's
offline tools (``zoo.ssl.bank``: cached feature bank, L-BFGS linear probe on all training labels, weighted kNN
k = 20, tau = 0.07, RankMe), beside the same architecture untrained (``random init``, one per seed) so every
number reads against "no training at all". The online probe's ``val/linear_acc`` (a linear layer trained during
the run on detached features) is reported too.

Writes ``<out>.md`` (a table per dataset: mean ± std over seeds) and ``<out>.json`` (every run's numbers).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
import yaml

from zoo.ssl.bank import feature_bank, knn_accuracy, linear_probe, rankme_of
from zoo.tools.compare import run_one

PROTOCOLS = Path(__file__).resolve().parents[2] / "experiments" / "protocols"


def protocol_overlay(config: str, dataset: str) -> list[str]:
    """``--config experiments/protocols/ssl_<dataset>.yaml`` unless ``config`` already trains on ``dataset``."""
    written_for = yaml.safe_load(Path(config).read_text())["data"]["init_args"].get("dataset")
    if written_for == dataset:
        return []
    overlay = PROTOCOLS / f"ssl_{dataset}.yaml"
    if not overlay.exists():
        raise FileNotFoundError(f"{config} trains on {written_for!r}; moving it to {dataset!r} needs the protocol "
                                f"overlay {overlay}")
    return ["--config", str(overlay)]


def untrained_config(config: str, overlay: list[str], out: Path) -> Path:
    """The experiment's model section with the overlay's model changes merged in, as a file for the bank."""
    settings = yaml.safe_load(Path(config).read_text())
    if overlay:
        changes = yaml.safe_load(Path(overlay[1]).read_text()).get("model", {})
        _merge(settings["model"], changes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump({"model": settings["model"]}))
    return out


def _merge(base: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def frozen_evaluation(dataset: str, **source) -> dict:
    bank = feature_bank(dataset, **source)
    return {"linear_probe": linear_probe(bank)["accuracy"], "knn": knn_accuracy(bank), "rankme": rankme_of(bank)}


def summary_table(rows: list[dict]) -> str:
    lines = ["| method | linear probe (%) | kNN (%) | online probe (%) | RankMe (backbone) | seeds |",
             "|---|---|---|---|---|---|"]

    def cell(values, scale=100.0, digits=2):
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        return f"{scale * np.mean(values):.{digits}f} ± {scale * np.std(values):.{digits}f}"

    names = list(dict.fromkeys(r["name"] for r in rows))
    names.sort(key=lambda n: -np.mean([r["linear_probe"] for r in rows if r["name"] == n]))
    for name in names:
        runs = [r for r in rows if r["name"] == name]
        lines.append(f"| {name} | {cell([r['linear_probe'] for r in runs])} | {cell([r['knn'] for r in runs])} | "
                     f"{cell([r.get('online_probe') for r in runs])} | {cell([r['rankme'] for r in runs], 1, 1)} | "
                     f"{len(runs)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiments", nargs="+", help="name=experiments/X.yaml (written for the first dataset)")
    parser.add_argument("--out", required=True, type=Path, help="output prefix: <out>.md and <out>.json")
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--datasets", type=lambda text: text.split(","), default=["cifar10_subset"])
    parser.add_argument("--root", default="runs/ssl_table")
    parser.add_argument("--no-random-init", dest="random_init", action="store_false",
                        help="leave out the untrained-encoder row")
    args, extra = parser.parse_known_args(argv)
    experiments = dict(e.split("=", 1) for e in args.experiments)
    extra = ["--trainer.callbacks+=zoo.tools.compare.RecordValidation", *extra]
    root = Path(args.root)

    tables, rows = [], []
    for dataset in args.datasets:
        dataset_rows = []
        for seed in args.seeds:
            if args.random_init:
                first = next(iter(experiments.values()))
                overlay = protocol_overlay(first, dataset)
                config = untrained_config(first, overlay, root / "configs" / f"random_init_{dataset}.yaml")
                dataset_rows.append({"name": "random init", "dataset": dataset, "seed": seed, "seconds": None,
                                     **frozen_evaluation(dataset, random_init=config, seed=seed)})
            for name, config in experiments.items():
                overlay = protocol_overlay(config, dataset)
                run = run_one(config, seed, f"{name}_{dataset}", str(root), [*overlay, *extra], ("sampler_seed",))
                checkpoint = root / f"{name}_{dataset}_s{seed}" / "checkpoints" / "last.ckpt"
                dataset_rows.append({"name": name, "dataset": dataset, "seed": seed, "seconds": run["seconds"],
                                     "online_probe": run["final"].get("val/linear_acc"),
                                     **frozen_evaluation(dataset, checkpoint=checkpoint)})
        rows += dataset_rows
        tables.append(f"### {dataset}\n\n{summary_table(dataset_rows)}\n")
        print(tables[-1], flush=True)

    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    commands = "\n".join(f"- `{n}`: `{c}`" for n, c in experiments.items())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(
        f"<!-- written by python -m zoo.tools.ssl_table -->\nSeeds {args.seeds} (initialisation and sampler order, "
        f"shared by all methods). Frozen backbone: linear probe = L-BFGS logistic regression on all training labels, "
        f"kNN k = 20, tau = 0.07. Hardware: {cpu}; each run's wall time is in the JSON.\n\n" + "\n".join(tables) + f"\nExperiments:\n{commands}\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
