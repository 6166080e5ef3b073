"""The feature space of the offline Fréchet distance: a small classifier trained on the generator's own data.

FID needs Inception-v3 weights, which cannot be downloaded offline. Instead, ``val/fd_<dataset>_cnn`` is the
Fréchet distance between real and generated images in the pooled features of ``zoo.core.nets.SmallCNN`` trained
here for a few hundred steps on the training split (same preprocessing as the generator: [-1, 1], same channels
and padding). It ranks models trained on the same data; it is **not** comparable to published FIDs.

The classifier is trained on first use and cached as ``$ZOO_CACHE_DIR/ict_features/<dataset>_<C>x<H>x<W>_cnn.pt``
(default ``ZOO_CACHE_DIR`` = the checkout's ``data/cache``), or ahead of time with

    python -m zoo.ict.train_feature_net --dataset mnist --grayscale --pad-to 32
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.core.nets import SmallCNN

from .data import ImageDataModule

__all__ = ["feature_net_path", "train_feature_net", "load_feature_net"]


def cache_dir() -> Path:
    return Path(os.environ.get("ZOO_CACHE_DIR", Path(__file__).resolve().parents[2] / "data" / "cache"))


def feature_net_path(data: ImageDataModule) -> Path:
    c, h, w = data.image_shape
    return cache_dir() / "ict_features" / f"{data.dataset}_{c}x{h}x{w}_cnn.pt"


def _as_float(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_feature_net(data: ImageDataModule, steps: int = 300, batch_size: int = 64, width: int = 16,
                      lr: float = 2e-3, seed: int = 0) -> tuple[SmallCNN, float]:
    """Adam on the training split; returns the network (eval mode) and its accuracy on the evaluation split."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = data.images("train"), torch.as_tensor(data.images("train_labels"))
    net = SmallCNN(num_classes=int(labels.max()) + 1, width=width, in_channels=data.image_shape[0])
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        loss = F.cross_entropy(net(_as_float(images[idx.numpy()])), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    eval_images, eval_labels = data.images("eval"), torch.as_tensor(data.images("eval_labels"))
    with torch.no_grad():
        correct = sum(int((net(_as_float(eval_images[i:i + 500])).argmax(1) == eval_labels[i:i + 500]).sum())
                      for i in range(0, len(eval_images), 500))
    return net, correct / len(eval_images)


def _save(net: SmallCNN, accuracy: float, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"state_dict": net.state_dict(), "width": net.num_features // 4, "eval_accuracy": accuracy,
                "num_classes": net.classifier.out_features, "in_channels": net.body[0].in_channels}, tmp)
    os.replace(tmp, path)  # atomic: a concurrent run never reads a partial file


def load_feature_net(data: ImageDataModule, train_if_missing: bool = True) -> SmallCNN:
    """The cached classifier for ``data`` (trained and cached first if missing), frozen, in eval mode."""
    path = feature_net_path(data)
    if not path.exists():
        if not train_if_missing:
            raise FileNotFoundError(f"no feature classifier at {path}; run python -m zoo.ict.train_feature_net")
        start = time.time()
        # callers evaluate under no_grad; the first call trains the classifier here, on a forked random state: a
        # run that trains it must draw the same random numbers afterwards as one that finds it cached (resume)
        with torch.enable_grad(), torch.random.fork_rng():
            net, accuracy = train_feature_net(data)
        _save(net, accuracy, path)
        print(f"[ict] trained the FD feature classifier on {data.dataset} in {time.time() - start:.0f}s "
              f"(eval accuracy {accuracy:.3f}); cached at {path}", flush=True)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    net = SmallCNN(saved["num_classes"], width=saved["width"], in_channels=saved["in_channels"])
    net.load_state_dict(saved["state_dict"])
    return net.eval().requires_grad_(False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--grayscale", action="store_true")
    parser.add_argument("--pad-to", type=int, default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    args = parser.parse_args(argv)
    data = ImageDataModule(dataset=args.dataset, grayscale=args.grayscale, pad_to=args.pad_to)
    path = feature_net_path(data)
    if path.exists() and not args.force:
        print(f"{path} exists (--force retrains it)")
        return
    net, accuracy = train_feature_net(data, steps=args.steps)
    _save(net, accuracy, path)
    print(f"eval accuracy {accuracy:.3f}; saved {path}")


if __name__ == "__main__":
    main()
