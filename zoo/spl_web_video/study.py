"""``python -m zoo.spl_web_video.study [--seeds 0,1,2] [--steps 600] [--rules spl,pseudo,weak]``: the same student,
data and steps pre-trained on the web set with each label rule, then fine-tuned; test accuracy (mean ± std over
seeds) beside the teacher alone, to ``zoo/spl_web_video/results.md``. The seed sets the initialisation and the
sampling; the clean split and the weak labels stay fixed, so every arm of a seed shares the same teacher."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from zoo.core.nets import SmallCNN
from zoo.core.views import WeakView
from zoo.spl_web_video.data import WebVideoDataModule
from zoo.spl_web_video.module import SPL

# experiments/spl_web_video_digits.yaml
DATA = dict(dataset="digits", num_labels=50, batch_size=32, uratio=2, absent_rate=0.3, related_rate=0.15,
            steps_per_epoch=100, num_workers=0)


def run_one(rule: str, seed: int, steps: int) -> dict[str, float]:
    L.seed_everything(seed, verbose=False)
    data = WebVideoDataModule(labeled_views={"weak": WeakView(flip=False)}, web_view=WeakView(flip=False),
                              sampler_seed=seed, **DATA)
    model = SPL(SmallCNN(num_classes=10, width=16), num_classes=10, label_rule=rule, lr=0.05, weight_decay=5e-4)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=steps, check_val_every_n_epoch=None)
    trainer.fit(model, datamodule=data)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--rules", default="spl,pseudo,weak")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.md")))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds, rules = [int(s) for s in args.seeds.split(",")], args.rules.split(",")
    start = time.time()
    runs = {rule: [run_one(rule, seed, args.steps) for seed in seeds] for rule in rules}

    def cell(values) -> str:
        values = 100 * np.array(values)
        return f"{values.mean():.1f} ± {values.std():.1f}"

    first = runs[rules[0]]
    lines = [f"# SPL vs plain pseudo-labels vs weak labels vs the teacher alone (digits, seeds {args.seeds})", "",
             f"SmallCNN width 16, {args.steps} steps (1/3 teacher, 1/3 pre-training on the web set, 1/3 fine-tuning), "
             f"{DATA}. Test accuracy (%) on the clean test split (540 images).", "",
             "| arm | test acc | teacher acc on web clips | query labels correct | sub-concept classes |",
             "|---|---|---|---|---|",
             f"| (d) teacher alone | {cell([r['val/teacher_acc'] for r in first])} | | | |"]
    for rule in rules:
        rs = runs[rule]
        lines.append(f"| {rule} | {cell([r['val/acc'] for r in rs])} | {cell([r['web/teacher_acc'] for r in rs])} | "
                     f"{cell([r['web/query_acc'] for r in rs])} | "
                     f"{np.mean([r['web/sub_concepts'] for r in rs]):.0f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Wall time {time.time() - start:.0f} s on one CPU thread (shared 2-core machine)."]
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
