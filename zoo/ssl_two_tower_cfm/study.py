"""``python -m zoo.ssl_two_tower_cfm.study``: the two-tower retriever with and without the SSL task (CFM, and RFM, its
ablation) on MovieLens-100k u1, over seeds, SSL weights (alpha) and training-data fractions; writes
``zoo/ssl_two_tower_cfm/results.md`` (one table per setting).

Every run is ``experiments/ssl_two_tower_cfm_movielens100k.yaml`` (or its ``_no_ssl`` baseline) at ``--steps``
steps, evaluated once at the end (recall@K over the full corpus, training positives excluded, overall and on the
tail items). A setting is:

- ``--evaluate test`` (the u1 test split) or ``validation`` (10 % of the *training* interactions held out, the test
  split unused): choose alpha / the optimiser on ``validation``, then report ``test``;
- ``--train-fraction``: train on only this share of the training interactions (the sparse regime the paper targets;
  the kept interactions are fixed, the same for every seed and arm);
- ``--extra``: further CLI overrides for every run of the setting (e.g. the paper's Adagrad).

Finished runs are kept in ``<out>/results.json``, so a rerun (or ``--arms`` in pieces) only trains what is missing.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
ARMS = {  # name -> (experiment, extra arguments)
    "no_ssl": ("ssl_two_tower_cfm_movielens100k_no_ssl", []),  # the baseline: main task only
    "ssl_rfm": ("ssl_two_tower_cfm_movielens100k", ["--model.init_args.masking=random"]),
    "ssl_cfm": ("ssl_two_tower_cfm_movielens100k", []),
}
METRICS = ("recall@10", "recall@50", "recall@100", "tail_recall@10", "tail_recall@50", "tail_recall@100")
VALIDATION_FRACTION = 0.1


def train(experiment: str, extra: list[str], seed: int, steps: int, root: str) -> dict:
    from zoo.core.cli import ZooCLI

    args = ["fit", "--config", str(EXPERIMENTS / f"{experiment}.yaml"), f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}", f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
            "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--trainer.enable_model_summary=false",
            "--run.resume=false", f"--run.root={root}", f"--run.name={experiment}_s{seed}", *extra]
    start = time.time()
    cli = ZooCLI(args=args)
    metrics = {m: float(cli.trainer.callback_metrics[f"val/{m}"]) for m in METRICS}
    return {**metrics, "seconds": time.time() - start}


def setting_name(evaluate: str, fraction: float, steps: int, extra: str) -> str:
    return f"{evaluate} | train fraction {fraction:g} | {steps} steps" + (f" | {extra}" if extra else "")


def table(results: dict) -> str:
    """One table per setting, rows = (arm, alpha); recall x100, mean ± std over seeds."""
    by_setting: dict[str, dict[str, list]] = {}
    for key, run in results.items():
        setting, arm, _seed = key.rsplit(" | ", 2)
        by_setting.setdefault(setting, {}).setdefault(arm, []).append(run)
    lines = ["# SSL two-tower on MovieLens-100k u1: recall over the full corpus (x100), mean ± std over seeds", "",
             "Written by `python -m zoo.ssl_two_tower_cfm.study`; discussion in the README. `validation` = 10 % of "
             "the training interactions held out (test split unused); `train fraction` = share of the training "
             "interactions kept (the same interactions for every seed and arm).", ""]
    for setting in sorted(by_setting):
        lines += [f"## {setting}", "", "| arm | seeds | " + " | ".join(METRICS) + " | s/run |",
                  "|---" * (len(METRICS) + 3) + "|"]
        for arm, runs in sorted(by_setting[setting].items(), key=lambda item: (item[0] != "no_ssl", item[0])):
            cells = [f"{100 * np.mean([r[m] for r in runs]):.2f} ± {100 * np.std([r[m] for r in runs]):.2f}"
                     for m in METRICS]
            lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) +
                         f" | {np.mean([r['seconds'] for r in runs]):.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=390, help="390 = 5 epochs of u1.base at batch 1024")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--alphas", default="1.0", help="SSL weights tried by the SSL arms, comma-separated")
    parser.add_argument("--train-fraction", type=float, default=1.0)
    parser.add_argument("--evaluate", choices=("test", "validation"), default="test")
    parser.add_argument("--extra", default="", help="space-separated CLI overrides for every run")
    parser.add_argument("--out", default="/tmp/ssl_two_tower_cfm_study", help="run directories and results.json")
    parser.add_argument("--table", default=str(Path(__file__).with_name("results.md")))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    setting = setting_name(args.evaluate, args.train_fraction, args.steps, args.extra)
    data = [f"--data.init_args.train_fraction={args.train_fraction}"]
    if args.evaluate == "validation":
        data.append(f"--data.init_args.validation_fraction={VALIDATION_FRACTION}")
    for arm in args.arms.split(","):
        experiment, arm_args = ARMS[arm]
        alphas = [None] if arm == "no_ssl" else [float(a) for a in args.alphas.split(",")]
        for alpha in alphas:
            name = arm if alpha is None else f"{arm} α={alpha:g}"
            weight = [] if alpha is None else [f"--model.init_args.ssl_weight={alpha}"]
            for seed in map(int, args.seeds.split(",")):
                key = f"{setting} | {name} | {seed}"
                if key not in results:
                    results[key] = train(experiment, [*arm_args, *weight, *data, *args.extra.split()], seed,
                                         args.steps, str(out))
                    store.write_text(json.dumps(results, indent=1))
                    print(key, {m: round(v, 4) for m, v in results[key].items()}, flush=True)
    Path(args.table).write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
