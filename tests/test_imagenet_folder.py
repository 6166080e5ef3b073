"""The lazy ImageNet loader (``zoo.core.datasets.load_imagenet``) on a tiny ILSVRC-2012-layout tree of REAL images:
3 Imagenette classes x 4 train / 2 val images from the offline subset, re-encoded as JPEG at several sizes and aspect
ratios into ``<tmp>/imagenet/{train,val}/<wnid>/*.JPEG``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.core.datasets import (CorruptImageError, ImageFolderImages, MissingDatasetError, decode_image,
                               evaluation_images, load_image_set, load_imagenette_subset)

# created in this (unsorted) order; ImageFolder's labels follow the sorted names
WNIDS = ("n03000134", "n01440764", "n02102040")
TRAIN_SIZES = ((96, 64), (64, 80), (64, 64), (120, 72))  # (width, height) of the 4 train images of a class
VAL_SIZE = (80, 64)


def _write(path, array, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array).resize(size, Image.BICUBIC)
    image.save(path, "JPEG", quality=95, subsampling=0)  # no chroma subsampling: close to the source
    return np.asarray(image)


@pytest.fixture(scope="module")
def sources():
    subset = load_imagenette_subset()
    return {wnid: subset.x_train[subset.y_train == k][:6] for k, wnid in enumerate(WNIDS)}


@pytest.fixture
def tree(tmp_path, monkeypatch, sources):
    """The tree, ZOO_DATA_DIR pointed at it; returns {wnid: [(split, array written), ...]}."""
    written = {}
    for wnid in WNIDS:
        for i, size in enumerate(TRAIN_SIZES):
            written.setdefault(wnid, []).append(
                ("train", _write(tmp_path / "imagenet" / "train" / wnid / f"{wnid}_{i}.JPEG", sources[wnid][i], size)))
        for i in range(2):
            written[wnid].append(("val", _write(tmp_path / "imagenet" / "val" / wnid / f"ILSVRC2012_val_{wnid}{i}.JPEG",
                                                sources[wnid][4 + i], VAL_SIZE)))
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZOO_SHARED_DATA", str(tmp_path / "no_shared"))
    return written


def test_labels_follow_sorted_wnids_and_items_are_the_files(tree):
    data = load_image_set("imagenet", download=False)
    assert data.classes == tuple(sorted(WNIDS)) and data.num_classes == 3
    assert (len(data.x_train), len(data.y_train), len(data.x_test), len(data.y_test)) == (12, 12, 6, 6)
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert np.bincount(data.y_train).tolist() == [4, 4, 4] and np.bincount(data.y_test).tolist() == [2, 2, 2]
    # each decoded train image (full resolution) is one of the images written into the folder its label names
    for image, label in zip(data.x_train, data.y_train):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        candidates = [(wnid, a) for wnid, items in tree.items() for split, a in items
                      if split == "train" and a.shape == image.shape]
        errors = [np.abs(image.astype(int) - a.astype(int)).mean() for _, a in candidates]
        best = int(np.argmin(errors))
        assert errors[best] < 3.0 and sorted(errors)[1] > 3 * errors[best]  # JPEG at quality 95
        assert data.classes[label] == candidates[best][0]
    assert sorted(a.shape[:2] for a in data.x_train) == sorted([(h, w) for w, h in TRAIN_SIZES] * 3)


def test_resize_rule_and_evaluation_crop(tree, tmp_path):
    wide, tall = tmp_path / "imagenet/train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG", \
        tmp_path / "imagenet/train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG"  # 96x64 and 64x80 (w x h)
    assert decode_image(wide).shape == (64, 96, 3)
    assert decode_image(wide, shorter_side=32).shape == (32, 48, 3)  # shorter side -> 32, aspect kept
    assert decode_image(tall, shorter_side=32).shape == (40, 32, 3)
    assert decode_image(wide, shorter_side=256, center_crop=224).shape == (224, 224, 3)
    # the centre crop is the middle of the resized image (torchvision's Resize(48) + CenterCrop(32))
    resized, cropped = decode_image(wide, shorter_side=48), decode_image(wide, shorter_side=48, center_crop=32)
    np.testing.assert_array_equal(cropped, resized[8:40, 20:52])
    with pytest.raises(ValueError, match="centre crop"):
        decode_image(wide, shorter_side=16, center_crop=32)
    data = load_image_set("imagenet", download=False)
    assert {x.shape for x in data.x_test} == {(224, 224, 3)}  # val: shorter side 256, centre 224
    from zoo.core.datasets import load_imagenet
    assert {x.shape[:2] for x in load_imagenet(train_shorter_side=32).x_train} == {(32, 48), (40, 32), (32, 32),
                                                                                  (32, 53)}


def test_construction_is_lazy(tree, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(fp) or real_open(fp, *a, **k))
    data = load_image_set("imagenet", download=False)
    subset = evaluation_images(data.x_train)[np.array([0, 5])]
    assert opened == [] and isinstance(data.x_train, ImageFolderImages) and len(subset) == 2
    data.x_train[3]
    assert len(opened) == 1 and str(opened[0]).endswith(f"{data.classes[0]}_3.JPEG")


def test_array_conversion_works_for_fixed_size_batches_and_refuses_otherwise(tree):
    data = load_image_set("imagenet", download=False)
    with pytest.raises(TypeError, match="evaluation_images"):
        np.asarray(data.x_train)
    batch = np.ascontiguousarray(evaluation_images(data.x_train)[2:5])  # what feature extraction does per batch
    assert batch.shape == (3, 224, 224, 3) and batch.dtype == np.uint8
    assert np.asarray(data.x_test).shape == (6, 224, 224, 3)
    small = evaluation_images(data.x_train)
    small.max_array_items = 4
    with pytest.raises(TypeError, match="in memory"):
        np.asarray(small)
    plain = np.zeros((2, 8, 8, 3), np.uint8)
    assert evaluation_images(plain) is plain  # in-memory sets are untouched


def test_missing_dataset_names_the_folder_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZOO_SHARED_DATA", str(tmp_path / "no_shared"))
    with pytest.raises(MissingDatasetError) as err:
        load_image_set("imagenet", download=False)
    message = str(err.value)
    assert str((tmp_path / "imagenet" / "train").resolve()) in message
    assert "image-net.org" in message and "valprep.sh" in message


def test_empty_class_folder_and_unknown_val_class_are_named(tree, tmp_path):
    unknown = tmp_path / "imagenet" / "val" / "n09999999"
    unknown.mkdir()
    with pytest.raises(ValueError, match="n09999999"):  # a val class the train split does not have
        load_image_set("imagenet", download=False)
    unknown.rmdir()
    empty = tmp_path / "imagenet" / "val" / WNIDS[0]
    for file in empty.iterdir():
        file.unlink()
    with pytest.raises(MissingDatasetError, match=str(empty.resolve())):
        load_image_set("imagenet", download=False)


def test_corrupt_files_are_named_on_access(tree, tmp_path):
    folder = tmp_path / "imagenet" / "train" / WNIDS[1]
    garbage, truncated = folder / f"{WNIDS[1]}_9.JPEG", folder / f"{WNIDS[1]}_0.JPEG"
    garbage.write_bytes(b"not a jpeg at all")
    truncated.write_bytes(truncated.read_bytes()[:400])
    data = load_image_set("imagenet", download=False)  # construction reads no image: the errors come on access
    position = {str(data.x_train.path(i)): i for i in range(len(data.x_train))}
    for path in (garbage, truncated):
        with pytest.raises(CorruptImageError, match=str(path)):
            data.x_train[position[str(path)]]


def test_ssl_data_module_serves_views_and_evaluation_batches(tree):
    from zoo.ssl.data import SSLDataModule
    from zoo.ssl.views import BYOLViews

    module = SSLDataModule("imagenet", views=BYOLViews(size=32), batch_size=4, steps_per_epoch=2, eval_batch_size=4,
                           bank_size=5, num_workers=0, download=False)
    module.setup("fit")
    assert module.num_classes == 3
    batch = next(iter(module.train_dataloader()))
    for view in ("view1", "view2"):
        assert batch[view].shape == (4, 3, 32, 32) and batch[view].dtype == torch.uint8
    assert batch["label"].shape == (4,) and set(batch["label"].tolist()) <= {0, 1, 2}
    bank, test = module.val_dataloader()
    bank_batch, test_batch = next(iter(bank)), next(iter(test))
    assert bank_batch["image"].shape == (4, 3, 224, 224) and test_batch["image"].shape == (4, 3, 224, 224)
    assert len(bank.dataset) == 5 and len(test.dataset) == 6
    normalised = module.on_after_batch_transfer(batch, 0)
    assert normalised["view1"].dtype == torch.float32
