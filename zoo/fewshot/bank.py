"""A trained run's frozen features on a few-shot split, extracted once and cached beside its checkpoint."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from .data import load_few_shot_split
from .episodes import extract_features

__all__ = ["FeatureBank", "load_run", "run_feature_bank"]


@dataclass
class FeatureBank:
    base_mean: np.ndarray  # (D,) mean feature of the base-class training images (CL2N's centre)
    novel: np.ndarray  # (n, D) features of the test episodes' images
    novel_labels: np.ndarray
    novel_val: np.ndarray  # (m, D) features of the validation episodes' images
    novel_val_labels: np.ndarray
    base_test: np.ndarray  # (b, D) features of held-out base-class images (episodes on classes the encoder learnt)
    base_test_labels: np.ndarray


def load_run(run_dir: str | Path, checkpoint: str = "last.ckpt") -> tuple[torch.nn.Module, dict]:
    """The trained LightningModule of a zoo run (``run_dir/config.yaml`` + ``run_dir/checkpoints/<checkpoint>``),
    in eval mode, and the run's config."""
    import lightning as L
    from jsonargparse import ArgumentParser

    run_dir = Path(run_dir)
    config_path, weights = run_dir / "config.yaml", run_dir / "checkpoints" / checkpoint
    for path in (config_path, weights):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train the base encoder first (make train EXP=<experiment>)")
    config = yaml.safe_load(config_path.read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    module = parser.instantiate(parser.parse_object({"model": config["model"]})).model
    module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=False)["state_dict"])
    return module.eval(), config


def run_feature_bank(run_dir: str | Path, checkpoint: str = "last.ckpt", device: str = "cpu") -> FeatureBank:
    """The features of the run's encoder (``module.encoder().features``) on the split its data module trained on
    (base mean, novel, novel-validation and held-out base images), cached in
    ``run_dir/fewshot_features_<checkpoint digest>.npz``."""
    run_dir = Path(run_dir)
    module, config = load_run(run_dir, checkpoint)
    digest = hashlib.sha1((run_dir / "checkpoints" / checkpoint).read_bytes()).hexdigest()[:12]
    cache = run_dir / f"fewshot_features_{digest}.npz"
    if cache.is_file():
        return FeatureBank(**np.load(cache))
    data = config["data"]["init_args"]
    split = load_few_shot_split(data.get("dataset", "cifar10_subset"), data.get("base_classes"))
    encoder = module.encoder()

    def features(images: np.ndarray) -> np.ndarray:
        return extract_features(encoder, images, split.mean, split.std, device=device)

    bank = FeatureBank(features(split.base[0]).mean(0), features(split.novel[0]), split.novel[1],
                       features(split.novel_val[0]), split.novel_val[1], features(split.base_test[0]),
                       split.base_test[1])
    np.savez(cache, **vars(bank))
    return bank
