"""The metric factories against independent references: scikit-learn, numpy, pycocotools, scipy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.metrics import accuracy_score

from zoo.core.metrics import accuracy, frechet_distance, mean_average_precision, mean_iou


def test_accuracy_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(300, 7, generator=g), torch.randint(0, 7, (300,), generator=g)
    metric = accuracy(7)
    for chunk in range(0, 300, 64):  # accumulated over uneven batches
        metric.update(logits[chunk:chunk + 64], target[chunk:chunk + 64])
    assert abs(metric.compute().item() - accuracy_score(target, logits.argmax(1))) < 1e-6


def test_miou_matches_numpy_confusion_matrix():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(4, 16, 16))
    target[0, :3] = 255  # ignored pixels
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 5, size=target.shape)) % 255
    valid = target != 255
    conf = np.bincount(5 * target[valid] + pred[valid], minlength=25).reshape(5, 5)
    iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
    metric, per_class = mean_iou(5, ignore_index=255), mean_iou(5, ignore_index=255, per_class=True)
    for m in (metric, per_class):
        m.update(torch.from_numpy(pred), torch.from_numpy(target))
    assert abs(metric.compute().item() - iou.mean()) < 1e-6
    np.testing.assert_allclose(per_class.compute().numpy(), iou, atol=1e-6)


def test_map_matches_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gts = [  # image id -> list of (box xyxy, label)
        [([10, 10, 60, 60], 0), ([70, 20, 120, 90], 1)],
        [([5, 5, 40, 50], 0), ([50, 50, 100, 100], 0), ([20, 60, 45, 95], 1)],
    ]
    dets = [
        [([12, 8, 58, 62], 0, 0.9), ([72, 25, 118, 85], 1, 0.8), ([0, 0, 30, 30], 0, 0.3)],
        [([6, 6, 41, 48], 0, 0.95), ([55, 45, 98, 104], 0, 0.6), ([20, 60, 45, 95], 0, 0.5), ([22, 58, 47, 90], 1, 0.7)],
    ]
    images = [{"id": i + 1, "width": 128, "height": 128} for i in range(2)]
    annotations, results = [], []
    for i, (g, d) in enumerate(zip(gts, dets)):
        for box, label in g:
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        for box, label, score in d:
            x0, y0, x1, y1 = box
            results.append({"image_id": i + 1, "category_id": label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2}]}
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    reference = evaluator.stats  # AP, AP50, AP75, APs, APm, APl, ...

    metric = mean_average_precision()
    metric.update(
        [{"boxes": torch.tensor([b for b, *_ in d], dtype=torch.float), "scores": torch.tensor([s for *_, s in d]),
          "labels": torch.tensor([lab for _, lab, _ in d])} for d in dets],
        [{"boxes": torch.tensor([b for b, _ in g], dtype=torch.float), "labels": torch.tensor([lab for _, lab in g])}
         for g in gts])
    result = metric.compute()
    for key, ref in zip(("map", "map_50", "map_75"), reference[:3]):
        assert abs(result[key].item() - ref) < 1e-4, (key, result[key].item(), ref)


# What the hand-written ``zoo.core.metrics.FrechetDistance`` (float64 sums, scipy's sqrtm; replaced by torchmetrics'
# FrechetInceptionDistance) returned on ``_fd_features()``, computed with it just before the switch. It returned a
# float32 tensor; in float64 it computed 6.566032435594709.
HAND_WRITTEN_FD = 6.566032409667969


def _fd_features(n_real=400, n_fake=300, dim=6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(n_real, dim))
    fake = rng.normal(loc=0.3, scale=1.2, size=(n_fake, dim)) @ rng.normal(size=(dim, dim)) * 0.5
    return real, fake


def _scipy_fd(real: np.ndarray, fake: np.ndarray) -> float:
    """The reference: Heusel et al.'s formula on numpy float64 moments, with scipy's matrix square root."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    c1, c2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real))


def _fd(real: np.ndarray, fake: np.ndarray, batch: int, features=None, dtype=torch.float64) -> torch.Tensor:
    metric = frechet_distance(features or torch.nn.Identity(), num_features=real.shape[1])
    for side, values in ((True, real), (False, fake)):
        for start in range(0, len(values), batch):
            metric.update(torch.from_numpy(values[start:start + batch]).to(dtype), real=side)
    return metric.compute()


@pytest.mark.parametrize("batch", [1000, 128, 7, 1])
def test_frechet_distance_matches_scipy_formula_whatever_the_batching(batch):
    real, fake = _fd_features()
    expected = _scipy_fd(real, fake)
    assert abs(expected - HAND_WRITTEN_FD) < 1e-7 * expected  # the reference is the metric that was replaced
    value = _fd(real, fake, batch)
    assert value.dtype == torch.float64 and abs(value.item() - expected) < 1e-10 * expected
    # float32 features: float64 moments and result all the same, up to the features' own rounding
    assert abs(_fd(real, fake, batch, dtype=torch.float32).item() - expected) < 1e-6 * expected


def test_frechet_distance_with_fewer_samples_than_features():
    """The regime of the CPU sweep's small evaluation sets: singular covariances, where sqrtm needed an offset."""
    real, fake = _fd_features(n_real=20, n_fake=24, dim=32)
    expected = _scipy_fd(real, fake)
    assert abs(_fd(real, fake, 10).item() - expected) < 1e-6 * expected


def test_frechet_distance_applies_its_frozen_extractor():
    real, fake = _fd_features()
    extractor = torch.nn.Sequential(torch.nn.Flatten(), _Scale(2.0))
    # a scaled feature space scales the distance by the square of the factor
    assert abs(_fd(real, fake, 128, extractor).item() - 4 * _scipy_fd(real, fake)) < 1e-9 * HAND_WRITTEN_FD
    metric = frechet_distance(extractor, num_features=6)
    metric.train()
    assert not any(m.training for m in extractor.modules())


class _Scale(torch.nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor
