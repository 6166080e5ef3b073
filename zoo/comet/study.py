"""``python -m zoo.comet.study``: COMET pre-training vs training from scratch on UCR sets with 10 % and 1 % labels,
3 seeds, written to ``zoo/comet/results.md``.

Per (set, seed): COMET pre-trains a small TS2Vec encoder on all training windows (sample + observation levels: UCR
sets have no patients or trials); then, per label fraction, (a) a logistic-regression probe on its frozen
averaged features and on a random encoder's (partial fine-tuning), and (b) full fine-tuning of encoder + head from
the COMET encoder and from the same random initialisation (training from scratch), scored on the official test split.
CPU-sized: encoder 64-d output, 16 hidden, depth 4; 150 pre-training and 150 fine-tuning steps.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from zoo.timeseries.data import TimeSeriesDataModule
from zoo.timeseries.encoder import TS2VecEncoder
from zoo.timeseries.hosts import TimeSeriesClassifier

from .module import COMET

ENCODER = dict(output_dims=64, hidden_dims=16, depth=4)
METRICS = ("accuracy", "f1", "auroc")


def _fit(module, data, steps: int) -> dict[str, float]:
    """``steps`` optimizer steps (none: evaluation only), then one evaluation on the test split."""
    settings = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1)
    if steps:
        L.Trainer(max_steps=steps, limit_val_batches=0, **settings).fit(module, datamodule=data)
    evaluator = L.Trainer(**settings)
    evaluator.validate(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in evaluator.callback_metrics.items()}


def run(dataset: str, seed: int, fraction: float, encoder_state: dict, init_state: dict, steps: int) -> dict:
    """One fraction: probes of the COMET and the random encoder, fine-tuning from each."""
    out = {}
    for name, state in (("comet", encoder_state), ("scratch", init_state)):
        data = TimeSeriesDataModule(dataset, batch_size=16, train_on="labeled", label_fraction=fraction,
                                    label_seed=seed, probe=False, eval_batch_size=512)
        data.setup("fit")
        L.seed_everything(seed, verbose=False)
        classifier = TimeSeriesClassifier(TS2VecEncoder(data.input_dims, **ENCODER), data.num_classes)
        classifier.network.load_state_dict(state)
        scores = _fit(classifier, data, steps)
        out[f"finetune_{name}"] = {m: scores[f"val/{m}"] for m in METRICS}
        probe_data = TimeSeriesDataModule(dataset, label_fraction=fraction, label_seed=seed, eval_batch_size=512)
        probe = COMET(TS2VecEncoder(data.input_dims, **ENCODER), weight_averaging=False)
        probe.network.load_state_dict(state)
        scores = _fit(probe, probe_data, 0)
        out[f"probe_{name}"] = {m: scores[f"val/probe_{m}"] for m in METRICS}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="ECG200,GunPoint")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fractions", default="0.1,0.01")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start, rows = time.time(), {}
    for dataset in args.datasets.split(","):
        for seed in map(int, args.seeds.split(",")):
            data = TimeSeriesDataModule(dataset, batch_size=32, group_by="none", eval_batch_size=512, seed=seed)
            data.setup("fit")
            L.seed_everything(seed, verbose=False)
            comet = COMET(TS2VecEncoder(data.input_dims, **ENCODER), patient_weight=0, trial_weight=0, lr=1e-3)
            init_state = {k: v.clone() for k, v in comet.network.state_dict().items()}
            _fit(comet, data, args.pretrain_steps)
            encoder_state = comet.ema.module.state_dict()
            for fraction in map(float, args.fractions.split(",")):
                result = run(dataset, seed, fraction, encoder_state, init_state, args.finetune_steps)
                for protocol, scores in result.items():
                    rows.setdefault((dataset, fraction, protocol), []).append(scores)
                print(dataset, seed, fraction, result, flush=True)
    minutes = (time.time() - start) / 60
    lines = ["# COMET vs training from scratch on UCR sets (python -m zoo.comet.study)", "",
             f"Sets {args.datasets}; seeds {args.seeds}; encoder {ENCODER}; COMET: sample + observation levels at "
             f"0.25 (no patient/trial ids), {args.pretrain_steps} steps, batch 32, AdamW 1e-3, weight average; "
             f"fine-tuning {args.finetune_steps} steps, batch 16, AdamW 1e-4; official test splits. "
             f"Mean ± std over seeds (%). Wall time {minutes:.1f} min, 1 thread.", "",
             "| set | labels | protocol | start | accuracy | macro-F1 | AUROC |", "|---|---|---|---|---|---|---|"]
    for (dataset, fraction, protocol), scores in rows.items():
        kind, start_from = protocol.split("_")
        cells = [f"{100 * np.mean([s[m] for s in scores]):.1f} ± {100 * np.std([s[m] for s in scores]):.1f}"
                 for m in METRICS]
        lines.append(f"| {dataset} | {fraction:.0%} | {'linear probe' if kind == 'probe' else 'fine-tune'} | "
                     f"{'COMET' if start_from == 'comet' else 'random init'} | " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
