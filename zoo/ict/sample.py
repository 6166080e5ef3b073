"""Sample a trained consistency model: a PNG grid, and optionally the paper's FID.

    python -m zoo.ict.sample --checkpoint runs/ict_mnist/checkpoints/last.ckpt --out grid.png --steps 1
    python -m zoo.ict.sample --checkpoint runs/ict_cifar10/checkpoints/last.ckpt --out grid.png --steps 2 \\
        --fid 50000

The model is rebuilt from the run's ``config.yaml`` (next to ``checkpoints/``, or ``--config``) and samples with the
EMA weights: 1 step from ``sigma_max``, or 2 steps through ``two_step_sigma`` (0.821). ``--fid N`` computes FID
(torch-fidelity's Inception-v3, whose weights must already be on disk; see ``zoo.core.metrics.inception_fid``)
between N samples and the run's training images, the CIFAR-10 protocol of the paper (50,000 samples). ``--fd``
recomputes the offline ``val/fd_<dataset>_cnn`` of the run's validation (same images, same noise).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from torchvision.utils import make_grid, save_image

from .module import ICT

__all__ = ["load_run", "main"]


def load_run(checkpoint: str | Path, config: str | Path | None = None) -> tuple[ICT, dict]:
    """The module of a run with the checkpoint's weights, and the run's resolved config."""
    checkpoint = Path(checkpoint)
    config = Path(config) if config else checkpoint.parent.parent / "config.yaml"
    if not config.exists():
        raise FileNotFoundError(f"run config not found at {config}; pass --config experiments/<name>.yaml")
    settings = yaml.safe_load(config.read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(ICT, "model")
    model = parser.instantiate(parser.parse_object({"model": settings["model"]})).model
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    return model.eval(), settings


@torch.no_grad()
def generate(model: ICT, num: int, steps: int, image_shape: tuple[int, int, int], seed: int = 0,
             batch_size: int = 500, device: str = "cpu"):
    """``num`` images in [-1, 1], in batches, from a seeded generator."""
    generator = torch.Generator(device).manual_seed(seed)
    for start in range(0, num, batch_size):
        size = min(batch_size, num - start)
        noises = torch.randn((steps, size, *image_shape), generator=generator, device=device)
        yield model.sample(noises, steps)[-1]


def inception_fid(model: ICT, settings: dict, num: int, steps: int, seed: int, device: str) -> float:
    from zoo.core.metrics import inception_fid as fid_metric

    from .data import ImageDataModule

    fid = fid_metric().to(device)  # raises, naming the expected path, when the Inception weights are missing
    data = ImageDataModule(**settings["data"]["init_args"])
    real = torch.from_numpy(data.images("train")).permute(0, 3, 1, 2)
    for start in range(0, len(real), 500):
        fid.update((real[start:start + 500].float() / 255).expand(-1, 3, -1, -1).to(device), real=True)
    for images in generate(model, num, steps, data.image_shape, seed, device=device):
        fid.update(((images + 1) / 2).expand(-1, 3, -1, -1), real=False)
    return float(fid.compute())


@torch.no_grad()
def offline_fd(model: ICT, settings: dict, device: str) -> dict[str, float]:
    """The validation's Fréchet distances in the zoo classifier's features (see ``train_feature_net``)."""
    from torch import nn

    from zoo.core.metrics import frechet_distance

    from .data import ImageDataModule
    from .train_feature_net import load_feature_net

    data = ImageDataModule(**settings["data"]["init_args"])
    net = load_feature_net(data).to(device)
    metrics = {steps: frechet_distance(nn.Identity(), net.num_features).to(device) for steps in (1, 2)}
    real_images = torch.from_numpy(data.images("eval")).permute(0, 3, 1, 2)
    for batch_idx, start in enumerate(range(0, len(real_images), data.eval_batch_size)):
        real = real_images[start:start + data.eval_batch_size].to(device).float() / 127.5 - 1.0
        real_features = net.features(real)
        for steps, images in model.evaluation_samples(real, batch_idx).items():
            metrics[steps].update(real_features, real=True)
            metrics[steps].update(net.features(images), real=False)
    name = f"fd_{data.dataset}_cnn"
    return {name: float(metrics[1].compute()), f"{name}_2step": float(metrics[2].compute())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Sample a trained iCT/CT model into a PNG grid (and FID).")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="PNG file for the grid")
    parser.add_argument("--steps", type=int, choices=(1, 2), default=1)
    parser.add_argument("--num", type=int, default=64, help="images in the grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=None, help="default: the run's config.yaml beside checkpoints/")
    parser.add_argument("--fid", type=int, default=0, metavar="N", help="also compute FID of N samples")
    parser.add_argument("--fd", action="store_true", help="also recompute the validation's offline FD")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model, settings = load_run(args.checkpoint, args.config)
    model.to(args.device)
    image_shape = (model.network.in_channels, model.network.img_resolution, model.network.img_resolution)
    images = next(generate(model, args.num, args.steps, image_shape, args.seed, args.num, args.device))
    save_image(make_grid((images + 1) / 2, nrow=int(args.num ** 0.5)), args.out)
    print(f"wrote {args.out}: {args.num} samples, {args.steps}-step")
    if args.fd:
        for name, value in offline_fd(model, settings, args.device).items():
            print(f"{name}: {value:.3f}")
    if args.fid:
        print(f"FID ({args.fid} samples, {args.steps}-step): "
              f"{inception_fid(model, settings, args.fid, args.steps, args.seed, args.device):.3f}")


if __name__ == "__main__":
    main()
