"""``python -m zoo.wscl.study [--seeds 0 1 2]``: WSCL against the same network trained with image labels alone, on
real COCO splices, tested on the 72 CASIA v1.0 samples; writes ``zoo/wscl/results.md`` and ``results.json``.

``--diagnose`` then scores the trained checkpoints on fresh draws of the training distribution (COCO splices with
seeds no training step used; the photos are the same 159): did the network learn splices at all?"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARMS = {"WSCL (MSC + IPC)": "wscl_coco_splices", "image labels only (MSC = IPC = 0)": "wscl_coco_splices_image_labels"}
METRICS = ("val/image_auc", "val/pixel_f1", "val/pixel_auc")


def run(stem: str, seed: int, root: str, steps: int | None = None) -> dict[str, float]:
    command = [sys.executable, "-m", "zoo", "fit", "--config", f"experiments/{stem}.yaml", f"--run.root={root}",
               f"--run.name={stem}_seed{seed}", f"--seed_everything={seed}", f"--data.init_args.sampler_seed={seed}",
               "--trainer.enable_progress_bar=false", "--run.resume=false"]
    if steps:
        command += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    final = out.split("[zoo] final evaluation:")[1].splitlines()  # the CLI prints "  <key>  <value>" lines
    result = {key: float(value) for key, value in (line.split() for line in final if line.startswith("  val/"))}
    result["wall_s"] = time.time() - start
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(stem, seed, result, flush=True)
    return result


def in_distribution(run_dir: Path, draws: int = 256) -> dict[str, float]:
    """Image AUC and pixel F1 (@0.5, mean over manipulated draws) of a trained run on fresh COCO splices."""
    import torch
    import yaml
    from sklearn.metrics import roc_auc_score

    from zoo.core.cli import ZooCLI
    from zoo.wscl.data import SpliceDataset
    from zoo.wscl.module import pixel_f1

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config = {k: v for k, v in config.items() if k not in ("ckpt_path", "weights_only")}  # fit's own keys
    cli = ZooCLI(args=["--config", json.dumps(config), f"--run.root={run_dir.parent}/diagnose"], run=False)
    model = cli.model
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    model.eval()
    data = SpliceDataset(crop_size=cli.datamodule.crop_size)
    items = [data.make(i % len(data), 10**12 + i) for i in range(draws)]
    with torch.no_grad():
        scores, maps = model.predict_maps(torch.stack([image for image, _, _ in items]))
    labels = np.array([label for _, label, _ in items])
    masks = torch.from_numpy(np.stack([mask for _, _, mask in items]))
    f1 = pixel_f1(maps[:, 0] > model.mask_threshold, masks)[torch.from_numpy(labels == 1)]
    return {"splice_image_auc": float(roc_auc_score(labels, scores.numpy())), "splice_pixel_f1": float(f1.mean())}


def diagnose(root: str, seeds: list[int]) -> list[str]:
    rows = ["", f"In-distribution check: {256} fresh COCO splice draws at the training crop size (same photos, unseen "
                f"draws), the checkpoints above.", "", "| arm | splice image AUC | splice pixel F1 |", "|---|---|---|"]
    for label, stem in ARMS.items():
        res = [in_distribution(Path(root) / f"{stem}_seed{seed}") for seed in seeds]
        cells = [f"{np.mean([r[k] for r in res]):.3f} ± {np.std([r[k] for r in res]):.3f}"
                 for k in ("splice_image_auc", "splice_pixel_f1")]
        rows.append(f"| {label} | {' | '.join(cells)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default="/tmp/wscl_study")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the experiment files')")
    parser.add_argument("--out", default="results", help="stem of the .md / .json written beside this file")
    parser.add_argument("--diagnose", action="store_true", help="only the in-distribution check of finished runs")
    args = parser.parse_args()
    here = Path(__file__).parent
    if args.diagnose:
        rows = diagnose(args.root, args.seeds)
        print("\n".join(rows))
        with open(here / f"{args.out}.md", "a") as f:
            f.write("\n".join(rows) + "\n")
        return
    results = {label: {seed: run(stem, seed, args.root, args.steps) for seed in args.seeds} for label, stem in ARMS.items()}
    rows = []
    for label, per_seed in results.items():
        cells = [f"{np.mean([r[m] for r in per_seed.values()]):.3f} ± {np.std([r[m] for r in per_seed.values()]):.3f}"
                 for m in METRICS]
        per_seed_auc = ", ".join(f"{r['val/image_auc']:.3f}" for r in per_seed.values())
        minutes = np.mean([r["cpu_s"] for r in per_seed.values()]) / 60
        rows.append(f"| {label} | {' | '.join(cells)} | {per_seed_auc} | {minutes:.1f} |")
    table = [f"Train: real COCO splices / copy-moves (image labels only), {args.steps or 'the files’'} steps; test: the 36 "
             f"tampered + 36 authentic CASIA v1.0 samples. Seeds {args.seeds}, mean ± std (population) over seeds.", "",
             "| arm | image AUC | pixel F1 (@0.5, mean over tampered images) | pixel AUC (tampered pixels pooled) | "
             "image AUC per seed | CPU min / run |", "|---|---|---|---|---|---|", *rows]
    print("\n".join(table))
    (here / f"{args.out}.md").write_text("\n".join(table) + "\n")
    (here / f"{args.out}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
