"""WSCL against the official code, and its data and metrics.

Golden numbers: the official functions of ``yhZhai/WSCL`` @ ef218a84df2ad6d4bb8fb175a80f8d2063bd761f, run on CPU on
the fixed inputs ``det(...)`` below (``models/main_model.py``: ``get_otsu_k``, ``MainModel.forward`` with
``otsu_sel=True``; ``losses/multi_view_consistency_loss.py``: ``MultiViewConsistencyLoss(soft=False)``;
``losses/volume_mask_loss.py``: ``VolumeMaskLoss``; ``losses/bundled_loss.py``: ``BundledLoss`` built by
``losses.get_bundled_loss`` with the ``configs/final.yaml`` options; ``models/srm_conv.py``: ``SRMConv2d(clip=5)``;
``models/bayar_conv.py``: ``BayarConv2d(3, 3, 5, padding=2)``). Metrics are checked against scikit-learn.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score

from zoo.wscl.data import ManipulationDataModule, MaskedEvalDataset, SpliceDataset
from zoo.wscl.module import (WSCL, binary_cross_entropy, gaussian_rampup, ipc_loss, msc_pseudo_map, otsu_pool,
                             otsu_split, pixel_f1, wscl_loss)
from zoo.wscl.networks import FCN, BayarConv2d, MultiViewFCN, SRMFilter

TINY_ENCODER = {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_type": "deep", "stem_width": 4}


def det(shape, phase=0.0, scale=1.0) -> torch.Tensor:
    """The fixed inputs the golden numbers were computed on."""
    n = math.prod(shape)
    return (scale * torch.sin(torch.arange(n, dtype=torch.float64) * 0.731 + phase)).reshape(shape).float()


# ------------------------------------------------------------------------------------------ adaptive pooling
@pytest.mark.parametrize("values, official_k", [
    (det((40,), 0.0) ** 3, 28), (det((40,), 1.0) ** 3, 27), (det((40,), 2.5) ** 3, 13),  # right, right, left
    (torch.cat([torch.zeros(30), torch.ones(10)]) + det((40,), 0.3, 0.01), 30),
    (torch.cat([torch.zeros(8), torch.ones(32)]) + det((40,), 0.3, 0.01), 8),
])
def test_otsu_split_is_the_official_greedy_search(values, official_k):
    assert int(otsu_split(values[None])[0]) == official_k
    assert int(otsu_split(values.flip(0)[None])[0]) == official_k  # the values need not be sorted


def test_otsu_pooling_matches_main_model():
    maps = det((3, 1, 6, 7), 0.2, 3.0)
    maps[1] -= 4.0
    maps[2, 0, :2] += 5.0
    torch.testing.assert_close(otsu_pool(maps.sigmoid()), torch.tensor([0.85812509, 0.20756650, 0.96220082]))


def test_otsu_pooling_pools_less_than_half_and_passes_gradients():
    maps = torch.rand(2, 1, 8, 8, requires_grad=True)
    otsu_pool(maps).sum().backward()
    used = (maps.grad != 0).flatten(1).sum(1)
    assert (used >= 1).all() and (used < 32).all()
    # one bright pixel on a flat map: the split stays at n//2 + 1 = 33, the top 31 values are pooled (mean 1/31)
    peaked = torch.zeros(1, 1, 8, 8)
    peaked[0, 0, 0, 0] = 1.0
    assert otsu_pool(peaked).item() == pytest.approx(1 / 31)


# ------------------------------------------------------------------------------------------- MSC
MSC_TARGET = [[1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0], [0] * 12,
              [1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0]]
WEIGHTS = [0.2, 0.4, 0.4]  # official opt.py normalises mvc_single_weight [1, 2, 2]


def msc_inputs():
    maps = [det((4, 1, 3, 4), phase).sigmoid() for phase in (0.0, 1.3, 2.6)]  # rgb, srm, bayar
    for m in maps:
        m[1] *= 0.3  # image 1 (manipulated): its ensemble never exceeds 0.5 -> the argmax rule
    return maps, torch.tensor([1.0, 1.0, 0.0, 1.0])


def test_msc_pseudo_map_and_loss_match_official():
    maps, labels = msc_inputs()
    target = msc_pseudo_map(maps, WEIGHTS, labels)
    assert target.flatten(1).tolist() == MSC_TARGET
    per_view = [F.mse_loss(m, target).item() for m in maps]
    assert per_view == pytest.approx([0.22154973447322845, 0.16317322850227356, 0.20256666839122772], abs=1e-7)


def test_msc_target_is_detached_and_zero_on_authentic_images():
    maps = [torch.full((2, 1, 2, 2), 0.9, requires_grad=True) for _ in range(3)]
    target = msc_pseudo_map(maps, WEIGHTS, torch.tensor([0.0, 1.0]))
    assert not target.requires_grad
    assert target[0].sum() == 0 and target[1].sum() == 4


# ------------------------------------------------------------------------------------------- IPC
def test_ipc_loss_matches_volume_mask_loss():
    maps, labels = msc_inputs()
    target = msc_pseudo_map(maps, WEIGHTS, labels)  # (4, 1, 3, 4), resized to the (6, 8) volume inside
    volume = det((4, 6, 8, 6, 8), 0.7)  # logits: the official volume is their sigmoid
    assert ipc_loss(volume, target).item() == pytest.approx(0.752286434173584, abs=1e-6)


def test_volume_matches_main_model():
    """Projection heads on a (3, 8, 4, 5) feature map: the official volume with fc_dim 32, volume_block_idx 1."""
    fcn = FCN(torch.nn.Identity(), "resnet18", encoder_kwargs=TINY_ENCODER, volume_block=1)
    with torch.no_grad():
        for head, phase in ((fcn.head1, 1.0), (fcn.head2, 2.0)):
            for i, conv in enumerate((head[0], head[2])):
                conv.weight.copy_(det(conv.weight.shape, phase + i, 0.5))
                conv.bias.copy_(det(conv.bias.shape, phase + i + 0.1, 0.1))
        volume = fcn.volume_logits(det((3, 8, 4, 5), 0.5, 2.0)).sigmoid()
    assert volume.shape == (3, 4, 5, 4, 5)
    assert volume.sum().item() == pytest.approx(621.462158203125, rel=1e-6)
    assert volume[1, 2, 3, 0, 4].item() == pytest.approx(0.5028752684593201, abs=1e-6)
    assert volume[0, 0, 0, 3, 1].item() == pytest.approx(0.5113945007324219, abs=1e-6)


def test_ipc_target_marks_pairs_that_disagree():
    pseudo = torch.tensor([[[[1.0, 0.0]]]])  # two patches: manipulated, pristine
    confident = torch.tensor([[-9.0, 9.0], [9.0, -9.0]]).view(1, 1, 2, 1, 2)  # inconsistent off the diagonal
    assert ipc_loss(confident, pseudo) < 1e-3 < ipc_loss(-confident, pseudo)


# ----------------------------------------------------------------------------------- whole loss and ramp
@pytest.mark.parametrize("epoch, official", [(0, 2.0776402950286865), (30, 2.14249587059021), (64, 2.3599631786346436)])
def test_total_loss_and_rampup_match_bundled_loss(epoch, official):
    maps, labels = msc_inputs()
    phases = (0.0, 1.3, 2.6)
    scores = [det((4,), p + 0.4).sigmoid() for p in phases]
    volumes = [det((4, 6, 8, 6, 8), p + 0.7) for p in phases]
    losses = wscl_loss(maps, scores, volumes, labels, WEIGHTS, 0.1, 0.1, gaussian_rampup(epoch / 65))
    assert losses["loss"].item() == pytest.approx(official, abs=2e-6)


def test_bce_on_probabilities_is_torch_bce_and_runs_under_bf16_autocast():
    p, y = torch.tensor([0.0, 0.3, 0.999, 1.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(binary_cross_entropy(p, y), F.binary_cross_entropy(p, y))
    module = WSCL(MultiViewFCN(encoder="resnet18", encoder_kwargs=TINY_ENCODER))
    module.ramp, module.log_dict = (lambda: 1.0), (lambda *args, **kwargs: None)
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_rampup_shape():
    assert gaussian_rampup(0.0) == pytest.approx(math.exp(-5)) and gaussian_rampup(1.0) == 1.0
    assert gaussian_rampup(0.5) == pytest.approx(math.exp(-1.25))


# ------------------------------------------------------------------------------------------ SRM / Bayar
@pytest.mark.parametrize("scale, sums, centre, clipped", [
    (4.0, (-28.391918182373047, 148.64830017089844, -19.549644470214844),
     [0.025865525007247925, 0.041804227977991104, 0.5955016613006592], 0),
    (40.0, (-34.76448440551758, 974.7696533203125, -22.18905258178711), [0.2586557865142822, 0.418038547039032, 5.0], 118),
])
def test_srm_filter_matches_official(scale, sums, centre, clipped):
    y = SRMFilter(clip=5.0)(det((2, 3, 9, 9), 0.1, scale))
    w = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) / y.numel()
    assert [y.sum().item(), y.abs().sum().item(), (y * w).sum().item()] == pytest.approx(list(sums), rel=1e-5)
    assert y[1, :, 4, 4].tolist() == pytest.approx(centre, abs=1e-6)
    assert int((y.abs() == 5).sum()) == clipped


def test_bayar_constraint_matches_official():
    bayar = BayarConv2d(3, 5, magnitude=1.0)
    with torch.no_grad():
        bayar.weight.copy_(det((3, 3, 24), 0.9).abs() + 0.05)
    kernel = bayar.kernel()
    assert kernel.sum((-1, -2)).abs().max() < 1e-6 and (kernel[:, :, 2, 2] == -1).all()
    assert kernel[1, 2].flatten()[:3].tolist() == pytest.approx([0.038769595324993134, 0.06073087826371193,
                                                                 0.05316155031323433], abs=1e-7)
    z = bayar(det((2, 3, 9, 9), 0.3))
    w = torch.arange(z.numel(), dtype=torch.float32).reshape(z.shape) / z.numel()
    assert [z.sum().item(), (z * w).sum().item()] == pytest.approx([-21.091846466064453, -9.714254379272461], rel=1e-5)
    assert z[0, :, 4, 4].tolist() == pytest.approx([0.39824822545051575, 0.6341215372085571, 0.18771767616271973], abs=1e-6)
    torch.testing.assert_close(bayar.weight.sum(-1), torch.ones(3, 3))  # the projection is stored, as officially


# ------------------------------------------------------------------------------------------- data
def test_masks_never_reach_the_training_batch():
    dm = ManipulationDataModule("coco_splices", "casia1_samples", crop_size=32, batch_size=4, steps_per_epoch=2,
                                num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"idx", "image", "label"}
    # and the training step runs on exactly that: nothing in it can read a mask
    module = WSCL(MultiViewFCN(encoder="resnet18", encoder_kwargs=TINY_ENCODER))
    module.ramp = lambda: 1.0
    module.log_dict = lambda *args, **kwargs: None
    assert torch.isfinite(module.training_step(batch, 0))


def test_splices_are_real_and_labelled_by_what_was_pasted():
    data = SpliceDataset(crop_size=64, jpeg_prob=0.0, flip=False)
    labels = []
    for seed in range(40):
        image, label, mask = data.make(seed % len(data), seed)
        labels.append(label)
        assert label == int(mask.any())
        if label:
            assert mask.mean() >= 0.005 and mask.mean() <= 0.35
        assert data[(seed % len(data), seed)]["label"] == label  # same draw from the same key
        assert torch.equal(data[(seed % len(data), seed)]["image"], image)
    assert 10 <= sum(labels) <= 30  # manipulated_fraction 0.5


def test_evaluation_set_is_the_72_casia_samples_interleaved():
    data = MaskedEvalDataset("casia1_samples")
    assert len(data) == 72
    assert [data[i]["label"] for i in range(4)] == [1, 0, 1, 0]
    item = data[0]
    assert item["mask"].shape == item["image"].shape[1:] and item["mask"].sum() > 0 and data[1]["mask"].sum() == 0


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_match_sklearn():
    """Two tampered and two authentic hand-made 2 x 3 maps through the module's validation step."""
    maps = torch.tensor([[[0.9, 0.8, 0.1], [0.2, 0.6, 0.4]], [[0.3, 0.7, 0.2], [0.1, 0.1, 0.9]],
                         [[0.1, 0.2, 0.1], [0.1, 0.3, 0.2]], [[0.6, 0.1, 0.2], [0.1, 0.1, 0.1]]])[:, None]
    masks = torch.tensor([[[1, 1, 0], [0, 0, 1]], [[0, 1, 0], [0, 0, 0]], [[0] * 3] * 2, [[0] * 3] * 2], dtype=torch.uint8)
    scores, labels = torch.tensor([0.7, 0.4, 0.5, 0.2]), torch.tensor([1, 1, 0, 0])
    module = WSCL(MultiViewFCN(encoder="resnet18", encoder_kwargs=TINY_ENCODER))
    module.log = lambda *args, **kwargs: None
    for i in range(0, 4, 2):
        module.predict_maps = lambda images, i=i: (scores[i : i + 2], maps[i : i + 2])
        module.validation_step({"image": torch.zeros(2, 3, 2, 3, dtype=torch.uint8), "label": labels[i : i + 2],
                                "mask": masks[i : i + 2]}, 0)
    assert module.val_image_auc.compute().item() == pytest.approx(roc_auc_score(labels, scores))
    f1 = [f1_score(masks[i].flatten(), (maps[i, 0] > 0.5).flatten().int()) for i in (0, 1)]
    assert module.val_pixel_f1.compute().item() == pytest.approx(np.mean(f1), abs=1e-5)
    pooled = roc_auc_score(masks[:2].flatten(), maps[:2, 0].flatten())
    assert module.val_pixel_auc.compute().item() == pytest.approx(pooled)
    assert pixel_f1(torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)).item() == 0.0


def test_the_official_optimiser_survives_the_cli(tmp_path):
    """The CLI passes every base argument explicitly: the changed defaults must be WSCL's own arguments."""
    from pathlib import Path

    from helpers import build

    model = build(Path(__file__).parents[1] / "experiments" / "wscl_coco_splices.yaml", tmp_path).model
    assert (model.optimizer_name, model.weight_decay, model.decay_norm_and_bias, model.ema) == ("adamw", 5e-4, True, None)
    assert model.cosine_cycles == 0.5


# ------------------------------------------------------------------------------------------ bad input
def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="views"):
        MultiViewFCN(views=["rgb", "noise"], encoder="resnet18", encoder_kwargs=TINY_ENCODER)
    with pytest.raises(ValueError, match="ensemble_weights"):
        WSCL(MultiViewFCN(views=["rgb"], encoder="resnet18", encoder_kwargs=TINY_ENCODER))
    with pytest.raises(ValueError, match="train_source"):
        ManipulationDataModule(train_source="imagenet")
    with pytest.raises(ValueError, match="area_range"):
        SpliceDataset(area_range=(0.3, 0.1))
