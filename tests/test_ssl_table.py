"""The family's supervised reference host and the comparison tool ``zoo.tools.ssl_table``: which overlay moves an
experiment to a dataset, the untrained baseline's config, and the table's arithmetic."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from zoo.ssl.encoders import timm_encoder
from zoo.ssl.hosts import Supervised
from zoo.ssl.views import SupervisedViews
from zoo.tools import ssl_table

ROOT = Path(__file__).resolve().parents[1]
SIMCLR = str(ROOT / "experiments" / "simclr_cifar10_subset.yaml")


def _tiny_encoder():
    torch.manual_seed(0)
    return timm_encoder("resnet18", cifar_stem=True, model_kwargs={"channels": [4, 8, 8, 8]})


def test_supervised_host_trains_its_encoder_with_the_labels():
    model = Supervised(_tiny_encoder(), num_classes=3)
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, features, logs = model.ssl_step({"view1": images, "label": labels})
    assert torch.allclose(loss, F.cross_entropy(model.classifier(model.network(images)), labels))
    assert len(features) == 1 and features[0].shape == (6, model.num_features)
    loss.backward()
    stem = next(model.network.parameters())  # timm zero-initialises each block's last BN: the stem always gets one
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    # other labels, other loss: the objective reads them (the SSL hosts do not)
    flipped, _, _ = model.ssl_step({"view1": images, "label": (labels + 1) % 3})
    assert not torch.allclose(loss, flipped)


def test_supervised_view_is_crop_and_flip_without_colour_change():
    import random

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    views = SupervisedViews(crop_scale=(1.0, 1.0))
    assert views.names == ("view1",)
    for seed in range(8):  # the whole image, maybe mirrored: every pixel keeps its colour
        out = views(image, random.Random(seed))["view1"]
        assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])


def test_protocol_overlay_moves_an_experiment_only_to_another_dataset(tmp_path):
    assert ssl_table.protocol_overlay(SIMCLR, "cifar10_subset") == []
    overlay = ssl_table.protocol_overlay(SIMCLR, "imagenette_subset")
    assert overlay[0] == "--config" and Path(overlay[1]).name == "ssl_imagenette_subset.yaml"
    with pytest.raises(FileNotFoundError, match="ssl_mnist.yaml"):
        ssl_table.protocol_overlay(SIMCLR, "mnist")


def test_untrained_config_merges_the_overlays_model_changes(tmp_path):
    overlay = ssl_table.protocol_overlay(SIMCLR, "imagenette_subset")
    path = ssl_table.untrained_config(SIMCLR, overlay, tmp_path / "init.yaml")
    model = yaml.safe_load(path.read_text())["model"]
    network = model["init_args"]["network"]["init_args"]
    assert network["cifar_stem"] is False and network["model_kwargs"] == {"channels": [16, 32, 64, 128]}
    assert model["class_path"] == "zoo.ssl.hosts.SimCLR"


def test_summary_table_means_stds_and_order():
    rows = [{"name": "a", "linear_probe": 0.5, "knn": 0.4, "online_probe": None, "rankme": 10.0, "seconds": 60},
            {"name": "a", "linear_probe": 0.7, "knn": 0.6, "online_probe": None, "rankme": 20.0, "seconds": 180},
            {"name": "b", "linear_probe": 0.8, "knn": 0.1, "online_probe": 0.3, "rankme": 5.0, "seconds": None}]
    lines = ssl_table.summary_table(rows).splitlines()
    assert lines[2] == "| b | 80.00 ± 0.00 | 10.00 ± 0.00 | 30.00 ± 0.00 | 5.0 ± 0.0 | 1 |"
    assert lines[3] == "| a | 60.00 ± 10.00 | 50.00 ± 10.00 | — | 15.0 ± 5.0 | 2 |"
