"""The AutoWS protocol over datasets, arms and seeds; writes ``zoo/autows_bench/results.md``.

``python -m zoo.autows_bench.study [--seeds 0 1 2]``: per dataset and seed, the end model (Lightning, the
experiments' settings) trained on (a) Snuba LFs + Snorkel label model, (b) the dataset's own WRENCH LFs + the same
label model, (c) the 100 labels alone (few-shot). No zero-shot arm: no CLIP (or other zero-shot) weights offline.
CPU sizes: the MNIST unlabeled subset and its Snuba iterations are below the paper's (:data:`SETTINGS`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import numpy as np

from .data import AutoWSDataModule
from .module import SoftLabelEndModel

# dataset -> (end-model backbone, data-module overrides), sized for ~12 minutes of one core in all. Reduced vs the
# paper: MNIST keeps 5k of its 50k unlabeled images (1k of the 10k validation pool the labels are drawn from) and
# runs 5 Snuba iterations per one-vs-rest class instead of 23. The WRENCH sets run the paper's 23.
SETTINGS = {
    "youtube": ("mlp", dict()),
    "sms": ("mlp", dict()),
    "trec": ("mlp", dict()),
    "mnist": ("lenet", dict(snuba_iterations=5, max_train=5000, max_valid=1000)),
}
ROWS = Path("/tmp/autows_bench_rows")  # one finished table row per dataset, so datasets run in separate processes


def run_arm(dataset: str, supervision: str, seed: int, steps: int) -> tuple[float, AutoWSDataModule]:
    backbone, overrides = SETTINGS[dataset]
    L.seed_everything(seed, verbose=False)
    data = AutoWSDataModule(dataset, supervision, seed=seed, steps_per_epoch=steps, **overrides)
    data.setup()
    model = SoftLabelEndModel(backbone, tuple(data.input_shape), data.num_classes)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=steps, check_val_every_n_epoch=None)
    trainer.fit(model, datamodule=data)  # one evaluation on the test split, after the last step
    return float(trainer.callback_metrics["val/acc"]), data


def dataset_row(dataset: str, seeds: list[int], steps: int) -> str:
    start = time.time()
    arms = ["snuba", "real_lfs", "few_shot"] if dataset != "mnist" else ["snuba", "few_shot"]
    scores = {arm: [] for arm in arms}
    lf_stats = []
    for seed in seeds:
        for arm in arms:
            accuracy, data = run_arm(dataset, arm, seed, steps)
            scores[arm].append(accuracy)
            if arm != "few_shot":
                w = data.weak_labels
                lf_stats.append((arm, w.num_lfs, w.coverage, w.label_accuracy))
            print(dataset, arm, seed, f"{accuracy:.4f}", f"{time.time() - start:.0f}s", flush=True)
    cell = lambda a: f"{100 * np.mean(scores[a]):.1f} ± {100 * np.std(scores[a]):.1f}" if a in scores else "—"  # noqa: E731

    def lfs(arm: str) -> str:
        stats = np.array([s[1:] for s in lf_stats if s[0] == arm])
        if not len(stats):
            return "—"
        num_lfs, cov, lm_acc = stats.mean(0)
        return f"{num_lfs:.0f} / {100 * cov:.0f}% / {100 * lm_acc:.1f}"

    setting = ", ".join(f"{k}={v}" for k, v in SETTINGS[dataset][1].items()) or "paper sizes (23 Snuba iterations)"
    return (f"| {dataset} | {setting} | {cell('snuba')} | {lfs('snuba')} | {cell('real_lfs')} | {lfs('real_lfs')} | "
            f"{cell('few_shot')} | n/a | {time.time() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="*", default=list(SETTINGS), help="none: only merge the rows")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    args = parser.parse_args()
    ROWS.mkdir(exist_ok=True)
    for dataset in args.datasets:
        (ROWS / f"{dataset}.md").write_text(dataset_row(dataset, args.seeds, args.steps) + "\n")
    rows = [(ROWS / f"{d}.md").read_text().strip() for d in SETTINGS if (ROWS / f"{d}.md").exists()]
    table = ["# AutoWS-Bench-101 at CPU scale: end-model test accuracy (%), mean ± std over seeds "
             f"{args.seeds}", "",
             "Written by `python -m zoo.autows_bench.study` (one process per dataset: `--datasets mnist`, then "
             "`--datasets` alone merges). 2-core shared CPU, one thread. LF stats: #LFs / train coverage / "
             "label-model accuracy on the covered train points. Wall time per dataset, all arms and seeds.", "",
             "| dataset | CPU setting | Snuba + LabelModel | Snuba LFs | real WRENCH LFs + LabelModel | real LFs | "
             "few-shot (100 labels) | zero-shot | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|", *rows]
    Path(args.out).write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
