"""MIC: parity of the masking, pseudo-label weighting, ClassMix and the classification host against lhoyer/MIC,
the teacher schedule, mIoU against a numpy confusion matrix, and smoke runs of the paper settings on stand-ins.

Reference constants come from RUNNING the official functions: lhoyer/MIC @ 2f932a98b5dd9f598aaeb32411863ceea0809314,
script /tmp/mic_ref/run_ref.py (kept out of the repo): it extracts by AST, from the official files,
``BlockMaskGenerator`` (seg/mmseg/models/utils/masking_transforms.py, mmseg's ``resize`` = F.interpolate),
``Masking`` (cls/dalib/modules/masking.py), ``DACS.get_pseudo_label_and_weight`` (seg/mmseg/models/uda/dacs.py),
``get_class_masks`` / ``one_mix`` (seg/mmseg/models/utils/dacs_transforms.py), ``MinimumClassConfusionLoss``,
``ConditionalDomainAdversarialLoss``, ``WarmStartGradientReverseLayer`` and ``DomainDiscriminator`` (cls/dalib),
and runs them on the inputs rebuilt below with the same seeds.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback

from helpers import StepChecker, build
from zoo.core.metrics import mean_iou
from zoo.segda.host import (blur_kernel_size, class_mix_masks, ema_alpha, one_mix, pseudo_label_and_weight,
                            teacher_mode)
from zoo.mic.classification import DomainDiscriminator, cdan_loss, grl_coefficient, mcc_loss
from zoo.mic.module import block_mask, mask_images

ROOT = Path(__file__).resolve().parents[1]

# --- constants printed by /tmp/mic_ref/run_ref.py (official code) ---
SEG_MASK_COLUMN_SUMS_0 = [0] * 14 + [20] * 14 + [0] * 14 + [20] * 14  # image 0; image 1 is fully masked
SEG_MASK_ROW_SUMS_0 = [14] * 40
CLS_MASKED_SUM, CLS_KEPT_PIXELS = 3245.31884765625, [195, 245]
PL_WEIGHT, PL_LABELS_SUM = 0.28333333134651184, 90
CLASS_MIX_MASK_0 = [[0, 0, 0, 0, 0, 0, 1, 1]] * 3 + [[1, 1, 1, 0, 0, 0, 1, 1]] * 3
ONE_MIX_SUM = 45.0
BLUR_KERNEL = {28: 3, 96: 9, 128: 13, 512: 51, 1024: 103}
MCC, CDAN = 0.696837306022644, 0.6353891491889954
GRL_AT = {0: 0.0, 1: 0.0004999999655410647, 500: 0.24491865932941437, 1000: 0.46211716532707214,
          2000: 0.7615941762924194}


def test_block_mask_matches_official():
    torch.manual_seed(0)
    mask = block_mask(torch.zeros(2, 3, 40, 56), block_size=16, ratio=0.7)  # round(2.5) x round(3.5) = 2 x 4 cells
    assert mask.shape == (2, 1, 40, 56)
    assert mask[0, 0].sum(0).int().tolist() == SEG_MASK_COLUMN_SUMS_0
    assert mask[0, 0].sum(1).int().tolist() == SEG_MASK_ROW_SUMS_0
    assert mask[1].sum() == 0


def test_classification_masking_matches_official():
    torch.manual_seed(1)
    images = torch.arange(2 * 3 * 28 * 28, dtype=torch.float32).reshape(2, 3, 28, 28) / 1000
    masked = mask_images(images, block_size=7, ratio=0.7)
    assert masked.sum().item() == pytest.approx(CLS_MASKED_SUM, rel=1e-6)
    assert (masked[:, 0] != 0).sum((1, 2)).tolist() == CLS_KEPT_PIXELS


def test_pseudo_label_weight_matches_official():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 5, 6) * 4
    labels, weight = pseudo_label_and_weight(logits, 0.968)
    assert weight.shape == (2, 5, 6) and torch.all(weight == weight[0, 0, 0])  # one scalar for the whole batch
    assert weight[0, 0, 0].item() == pytest.approx(PL_WEIGHT, abs=1e-7)
    assert labels.sum().item() == PL_LABELS_SUM


def test_class_mix_matches_official():
    gt = torch.tensor([[[0, 0, 1, 1, 2, 2, 255, 3]] * 3 + [[4, 4, 4, 1, 1, 1, 255, 255]] * 3,
                       [[5, 5, 5, 5, 0, 0, 0, 0]] * 6])
    np.random.seed(3)
    masks = class_mix_masks(gt)
    assert masks.shape == (2, 1, 6, 8)
    assert masks[0, 0].int().tolist() == CLASS_MIX_MASK_0 and masks[1].sum() == 0
    mixed = one_mix(masks[0], torch.full((3, 6, 8), 2.0), torch.full((3, 6, 8), -1.0))
    assert mixed.sum().item() == ONE_MIX_SUM


def test_blur_kernel_matches_official():
    assert {side: blur_kernel_size(side) for side in BLUR_KERNEL} == BLUR_KERNEL


def test_strong_transform_is_dacs_colour_jitter_and_blur():
    """``dacs_transforms.color_jitter`` / ``gaussian_blur`` (lhoyer/MIC seg/mmseg/models/utils): kornia 0.5's
    ColorJitter, whose brightness is *additive* (today's ColorJiggle; today's kornia ColorJitter multiplies), applied
    on the 0..1 scale of each mixed image, and a Gaussian blur with the 10 %-of-side odd kernel. The official code
    cannot run here (mmcv/mmseg), so the semantics are checked piece by piece."""
    from kornia.augmentation import ColorJiggle
    from kornia.filters import gaussian_blur2d

    from zoo.segda.host import strong_transform
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    images = (torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0)) * 255 -
              torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(strong_transform(images, 0.2, 0.5), images)  # draws at the thresholds: neither op
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    # kornia 0.5's ColorJitter = today's ColorJiggle: its brightness is an additive shift on the 0..1 scale
    torch.manual_seed(0)
    unit = (images[:1] * sd + m) / 255
    brightened = ColorJiggle(brightness=0.2)(unit)
    inside = (brightened > 0) & (brightened < 1)
    assert (brightened - unit)[inside].std() < 1e-5 and 0 < abs(float((brightened - unit)[inside].mean())) <= 0.2
    # the transform is that jitter (s = 0.2 for all four factors), drawn per image, on the denormalised image
    torch.manual_seed(1)
    jittered = strong_transform(images, 0.9, 0.0)
    torch.manual_seed(1)
    jiggle = ColorJiggle(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.2)
    expected = torch.cat([(jiggle((image[None] * sd + m) / 255) * 255 - m) / sd for image in images])
    torch.testing.assert_close(jittered, expected)
    assert not torch.allclose(jittered, images)
    # blur only: kornia's Gaussian blur, kernel (3, 3) for 12 x 20 (10 % of each side, odd), sigma ~ U(0.15, 1.15)
    np.random.seed(3)
    blurred = strong_transform(images, 0.0, 0.9)
    np.random.seed(3)
    sigmas = [np.random.uniform(0.15, 1.15) for _ in range(2)]
    for image, out, sigma in zip(images, blurred, sigmas):
        torch.testing.assert_close(out, gaussian_blur2d(image[None], (blur_kernel_size(12), blur_kernel_size(20)),
                                                        (sigma, sigma))[0])


def test_classification_host_matches_official():
    torch.manual_seed(4)
    assert mcc_loss(torch.randn(8, 5) * 2, temperature=2.0).item() == pytest.approx(MCC, rel=1e-5)
    torch.manual_seed(5)
    discriminator = DomainDiscriminator(3 * 4, hidden=16)
    torch.manual_seed(6)
    g_s, f_s, g_t, f_t = torch.randn(4, 3), torch.randn(4, 4), torch.randn(4, 3), torch.randn(4, 4)
    assert cdan_loss(discriminator, g_s, f_s, g_t, f_t, 0.0).item() == pytest.approx(CDAN, rel=1e-5)
    for iteration, coefficient in GRL_AT.items():
        assert grl_coefficient(iteration) == pytest.approx(coefficient, rel=1e-6, abs=1e-9)


def test_teacher_schedule_and_mode():
    assert [ema_alpha(t, 0.999) for t in (1, 2, 3)] == [0.5, 1 - 1 / 3, 0.75]
    assert ema_alpha(10**6, 0.999) == 0.999
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5)).eval()
    x = torch.randn(2, 3, 5, 5) * 3 + 1
    running = net[1].running_mean.clone()
    with teacher_mode(net):
        out = net(x)
        assert not net[2].training and net[1].training
    expected = torch.nn.functional.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias, training=True)
    assert torch.allclose(out, expected, atol=1e-5)  # batch statistics, no dropout
    assert torch.equal(net[1].running_mean, running) and not net[1].training  # nothing touched, mode restored


def test_miou_matches_numpy_confusion_matrix():
    from zoo.segda.data import load_segmentation_set

    dusk = load_segmentation_set("camvid_dusk", "val")
    labels = torch.from_numpy(np.stack([dusk.load(i)[1] for i in range(8)])).long()
    predictions = torch.roll(labels, shifts=3, dims=2).clamp(max=10)  # a shifted copy: realistic errors
    predictions[:, :10] = 2
    metric, per_class = mean_iou(11), mean_iou(11, per_class=True)
    for chunk in range(0, 8, 3):  # accumulated over batches
        metric.update(predictions[chunk:chunk + 3], labels[chunk:chunk + 3])
        per_class.update(predictions[chunk:chunk + 3], labels[chunk:chunk + 3])
    valid = labels.numpy() != 255
    confusion = np.bincount(labels.numpy()[valid] * 11 + predictions.numpy()[valid], minlength=121).reshape(11, 11)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = np.diag(confusion) / np.where(union > 0, union, np.nan)
    assert metric.compute().item() == pytest.approx(np.nanmean(iou), abs=1e-6)
    assert np.allclose(per_class.compute().numpy(), np.nan_to_num(iou), atol=1e-6)


@pytest.mark.parametrize("config", ["mic_camvid_day_dusk", "mic_mnist_usps"])
def test_teacher_labels_the_unmasked_target_and_moves_by_the_schedule(config, tmp_path):
    cli = build(ROOT / "experiments" / f"{config}.yaml", tmp_path)
    seen, targets, checker = [], [], StepChecker()
    cli.model.ema.module.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()) if cli.trainer.training else None)

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            targets.append(batch["target"]["image"].clone())

    cli.trainer.callbacks += [checker, Record()]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(targets) == 3 and all(torch.equal(s, t) for s, t in zip(seen, targets))
    assert cli.model.ema_decay_at(0) == 0.5  # the update after the first step is DAFormer's iteration-1 update
    assert max(checker.ema_errors) < 1e-6 and all(math.isfinite(x) for x in checker.losses)


def test_missing_paper_data_names_the_path(tmp_path, monkeypatch):
    from zoo.core.datasets import MissingDatasetError
    from zoo.segda.data import load_segmentation_set

    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    for name, expected in (("gta5", "gta/images"), ("cityscapes", "leftImg8bit/val")):
        with pytest.raises(MissingDatasetError, match=expected):
            load_segmentation_set(name, "val" if name == "cityscapes" else "train")


def test_daformer_optimiser_groups_use_the_zoo_no_decay_rule():
    """One no-decay rule in the zoo: every BatchNorm parameter of the CPU-sized DAFormer (32 of them) and every bias
    get no weight decay; the head trains at 10x the learning rate."""
    from zoo.core.module import param_groups
    from zoo.segda.networks import SmallDAFormer

    net = SmallDAFormer(num_classes=11)
    groups = param_groups(net, 0.01, lr=6e-5, lr_multipliers={"head.": 10.0})
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    head = {id(p) for p in net.head.parameters()}
    norms = [p for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert len(norms) == 32 and all(id(p) in no_decay for p in norms)
    for name, p in net.named_parameters():
        group = next(g for g in groups if any(q is p for q in g["params"]))
        assert group["lr"] == pytest.approx(6e-4 if id(p) in head else 6e-5)
        assert (group["weight_decay"] == 0) == (p.ndim <= 1), name
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
