"""``python -m zoo.ferkd.generate --teacher runs/<run>/checkpoints/last.ckpt [--out ...] [--crops-per-image R]``:
label R random-resized crops of every training image with a teacher trained in the zoo (FKD's soft-label
generation, ``FKD_SLG/generate_soft_label.py``), into one store file (default ``runs/<run>/soft_labels.pt``).

The teacher's network and dataset are read from the run's ``config.yaml``; its EMA weights are used when the run kept
an EMA (what the run deployed), its trained network otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch
import yaml

from zoo.core.datasets import load_image_set

from .store import build_store, save_store

__all__ = ["load_teacher", "main"]


def _instantiate(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**(spec.get("init_args") or {}))


def load_teacher(checkpoint: str | Path) -> tuple[torch.nn.Module, dict]:
    """The network of a zoo run (built from ``<run>/config.yaml``) with the checkpoint's weights, and the config."""
    checkpoint = Path(checkpoint)
    config_file = checkpoint.parent.parent / "config.yaml"
    for needed in (checkpoint, config_file):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} not found: train the teacher first, e.g. "
                                    "`make train EXP=ferkd_cifar10_subset_teacher`")
    config = yaml.safe_load(config_file.read_text())
    network = _instantiate(config["model"]["init_args"]["network"])
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    prefix = "ema.module." if any(k.startswith("ema.module.") for k in state) else "network."
    network.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return network.eval(), config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="a zoo checkpoint, runs/<run>/checkpoints/last.ckpt")
    parser.add_argument("--out", default=None, help="the store file (default: runs/<run>/soft_labels.pt)")
    parser.add_argument("--dataset", default=None, help="default: the teacher run's dataset")
    parser.add_argument("--crops-per-image", type=int, default=500, help="R (official --num_crops 500)")
    parser.add_argument("--top-k", type=int, default=5, help="stored probabilities per crop (marginal_smoothing_k5)")
    parser.add_argument("--crop-size", type=int, default=None, help="default: the images' own size")
    parser.add_argument("--scale", type=float, nargs=2, default=(0.08, 0.936), help="RandomResizedCrop area range")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (official --temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    teacher, config = load_teacher(args.teacher)
    dataset = args.dataset or config["data"]["init_args"]["dataset"]
    data = load_image_set(dataset, download=False)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) * 255 for v in (data.mean, data.std))
    start = time.time()
    store = build_store(teacher, data.x_train, data.y_train, mean, std, args.crops_per_image, args.top_k,
                        args.crop_size, tuple(args.scale), temperature=args.temperature, seed=args.seed,
                        dataset=dataset, device=args.device)
    store["teacher"] = str(args.teacher)
    out = save_store(store, args.out or Path(args.teacher).parent.parent / "soft_labels.pt")
    top1 = (store["topk_index"][..., 0].long() == torch.as_tensor(data.y_train).view(-1, 1)).float().mean()
    print(f"[ferkd] {out}: {store['num_images']} images x {args.crops_per_image} crops in {time.time() - start:.0f} s;"
          f" teacher top-1 on the crops {100 * top1:.1f} %, mean p(true class) {store['gt_prob'].mean():.3f}")


if __name__ == "__main__":
    main()
