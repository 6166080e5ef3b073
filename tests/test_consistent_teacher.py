"""Consistent-Teacher: parity with the official code, FAM-3D behaviour, box transforms, mAP, data, smoke runs.

Parity constants come from running the official functions (Adamdad/ConsistentTeacher @ b49a9ce1c0ae, files
``ssod/models/consistent_teacher.py`` (``gmm_policy``, executed as a plain function with numpy and sklearn) and
``ssod/core/bbox/assigners/dynamic_assigner.py`` (``DynamicSoftLabelAssigner.assign``, with mmdet's AssignResult,
registry and BboxOverlaps2D stubbed by a few lines of torch)) on the inputs built by ``_scores_case`` and
``_assign_case`` below, in a scratch directory outside the repository.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from helpers import build

from zoo.consistent_teacher.data import DetectionSemiDataModule, collate, labeled_split, load_detection_set
from zoo.consistent_teacher.detector import BOX_CODER, Detector, FAM3DHead, deform_sampling, grid_priors
from zoo.consistent_teacher.losses import (detection_loss, dynamic_assign, focal_loss_with_prob, gmm_threshold,
                                           push_scores, select_by_score_sum, static_assign, transform_boxes_torch)
from zoo.consistent_teacher.module import ConsistentTeacher, map_metrics
from zoo.consistent_teacher import transforms
from zoo.consistent_teacher.transforms import LABELED, STRONG, WEAK, Augment
from zoo.core.datasets import MissingDatasetError
from zoo.core.metrics import mean_average_precision

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning threads per process slow convs 10x+."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ parity with the official code
def _scores_case(k: int, n: int) -> np.ndarray:
    return np.array([(0.08 + 0.25 * (0.5 + 0.5 * math.sin(7.3 * i + k))) if i % 3 else
                     (0.55 + 0.4 * (0.5 + 0.5 * math.sin(3.1 * i + k))) for i in range(n)], np.float32)


# official gmm_policy(scores, given_gt_thr=0, policy) for 'high' and 'middle'
GMM_REFERENCE = {(0, 3): (0.0, 0.0), (1, 12): (0.6328725218772888, 0.5964628458023071),
                 (2, 40): (0.6762086153030396, 0.5503010153770447), (3, 100): (0.7510657906532288, 0.5503208041191101)}


@pytest.mark.parametrize("case", sorted(GMM_REFERENCE))
def test_gmm_threshold_matches_official(case):
    scores = _scores_case(*case)
    high, middle = GMM_REFERENCE[case]
    assert gmm_threshold(scores, default=0.0, policy="high") == pytest.approx(high, abs=1e-6)
    assert gmm_threshold(scores, default=0.0, policy="middle") == pytest.approx(middle, abs=1e-6)


def _assign_case():
    priors = torch.tensor([[x * s, y * s, s, s] for s, size in ((8, 8), (16, 4)) for y in range(size)
                           for x in range(size)], dtype=torch.float32)
    i = torch.arange(len(priors), dtype=torch.float32)
    side = priors[:, 2] * 4 * (1 + 0.3 * torch.sin(1.7 * i))
    cx, cy = priors[:, 0] + 3 * torch.sin(2.3 * i), priors[:, 1] + 3 * torch.cos(1.1 * i)
    boxes = torch.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side * 0.6], 1)
    scores = torch.sigmoid(torch.stack([torch.sin(0.9 * i) * 3 - 1, torch.cos(1.3 * i) * 3 - 1,
                                        torch.sin(0.4 * i) * 2], 1))
    gt = torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0], [30.0, 28.0, 62.0, 62.0]])
    return scores, boxes, priors, gt, torch.tensor([0, 2, 1])


# official DynamicSoftLabelAssigner(topk=13, iou_factor=2.0).assign: positive priors, their gt, their IoU
ASSIGN_POSITIVES = [20, 21, 22, 26, 27, 28, 35, 42, 45, 46, 53, 54, 61, 70, 73]
ASSIGN_GT = [1, 1, 1, 0, 0, 1, 0, 0, 2, 2, 2, 2, 2, 0, 0]
ASSIGN_IOU = [0.403592, 0.450339, 0.418298, 0.555759, 0.792149, 0.413184, 0.640757, 0.478466, 0.565741, 0.798282,
              0.608715, 0.676169, 0.429748, 0.445257, 0.493349]


def test_dynamic_assign_matches_official():
    scores, boxes, priors, gt, labels = _assign_case()
    anchors = torch.cat([priors[:, :2] - 4 * priors[:, 2:], priors[:, :2] + 4 * priors[:, 2:]], 1)
    assigned, iou = dynamic_assign(scores, boxes, anchors, priors[:, 2], gt, labels, topk=13, iou_factor=2.0)
    positives = (assigned >= 0).nonzero().squeeze(1)
    assert positives.tolist() == ASSIGN_POSITIVES
    assert assigned[positives].tolist() == ASSIGN_GT
    assert iou[positives].tolist() == pytest.approx(ASSIGN_IOU, abs=1e-5)
    assert (iou[assigned < 0] == 0).all()


def test_dynamic_assign_no_boxes_is_all_background():
    scores, boxes, priors, _, _ = _assign_case()
    assigned, _ = dynamic_assign(scores, boxes, boxes, priors[:, 2], torch.zeros(0, 4), torch.zeros(0))
    assert (assigned == -1).all()


def test_static_assign_thresholds_and_best_anchor():
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 12], [0, 0, 10, 20], [50, 50, 60, 60], [40, 40, 70, 70]],
                           dtype=torch.float32)
    gt = torch.tensor([[0, 0, 10, 10], [50, 50, 80, 80.0]])
    # IoUs: a0 1.0, a1 0.83 -> gt0; a2 0.5 -> gt0 (>= 0.5); a3 with gt1 0.11 < 0.4 -> background;
    # a4 with gt1 0.44 in [0.4, 0.5) would be ignored, but it is gt1's best anchor -> positive (low-quality match)
    assert static_assign(anchors, gt).tolist() == [0, 0, 0, -1, 1]
    assert static_assign(anchors[:4], gt[1:]).tolist() == [-1, -1, -1, 0]
    assert static_assign(anchors, torch.zeros(0, 4)).tolist() == [-1] * 5


def test_focal_loss_on_probabilities_equals_torchvision_on_logits():
    from torchvision.ops import sigmoid_focal_loss

    logits = torch.linspace(-4, 4, 24).reshape(6, 4)
    targets = (torch.arange(24).reshape(6, 4) % 5 == 0).float()
    expected = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    assert torch.allclose(focal_loss_with_prob(logits.sigmoid(), targets), expected, atol=1e-6)


def test_loose_filter_keeps_n_plus_one_best():
    # the official rule by hand: sum = 1.9 -> n = int(2.4) = 2 -> threshold scores_sorted[2] - 1e-5 = 0.3 - 1e-5
    scores = torch.tensor([0.3, 0.9, 0.1, 0.6])
    assert select_by_score_sum(scores).tolist() == [True, True, False, True]
    assert select_by_score_sum(torch.tensor([0.99])).tolist() == [True]  # n capped at len - 1
    assert select_by_score_sum(torch.zeros(0)).tolist() == []


def test_score_queue_is_newest_first_and_fixed_length():
    queue = torch.tensor([0.5, 0.4, 0.0, 0.0])
    assert push_scores(queue, torch.tensor([0.9, 0.8])).tolist() == pytest.approx([0.9, 0.8, 0.5, 0.4])
    assert push_scores(queue, torch.arange(6.0)).tolist() == [0, 1, 2, 3]


def test_detection_loss_normalisers():
    scores = torch.full((1, 3, 2), 0.5, requires_grad=True)
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 20, 20], [30, 30, 40, 40.0]]], requires_grad=True)
    anchors = boxes.detach()[0]
    gt, labels = [torch.tensor([[0, 0, 10, 10.0]])], [torch.tensor([1])]
    static = detection_loss(scores, boxes, anchors, torch.full((3,), 8.0), gt, labels, adaptive_assignment=False)
    # anchor 0 is the only positive (IoU 1; anchor 1 has 0.25): focal sum over 3 priors x 2 classes / 1 positive
    targets = torch.tensor([[0, 1], [0, 0], [0, 0.0]])
    assert static["cls"].item() == pytest.approx(focal_loss_with_prob(scores[0].detach(), targets).sum().item())
    assert static["box"].item() == pytest.approx(0.0, abs=1e-6)  # the positive's box is exact
    (static["cls"] + static["box"]).backward()
    assert scores.grad.abs().sum() > 0


# ------------------------------------------------------------------ FAM-3D
def _fam3d_inputs(head_channels=32, sizes=((16, 16), (8, 8), (4, 4))):
    torch.manual_seed(0)
    head = FAM3DHead(head_channels, num_classes=3, feat_channels=head_channels, stacked_convs=2)
    features = [torch.randn(2, head_channels, h, w) for h, w in sizes]
    anchors, _ = grid_priors(list(sizes), (8, 16, 32), 8.0)
    return head, features, list(anchors.split([h * w for h, w in sizes]))


def _plain_boxes(head, features, anchors):
    """Per-level decoded boxes without alignment, from the head's own towers."""
    out = []
    for x, a in zip(features, anchors):
        _, reg_feat, _ = head._towers(x)
        deltas = head.reg_out(reg_feat).flatten(2).transpose(1, 2).reshape(-1, 4)
        out.append(BOX_CODER.decode_single(deltas, a.repeat(x.shape[0], 1)).reshape(x.shape[0], -1, 4))
    return out


def test_fam3d_shapes():
    head, features, anchors = _fam3d_inputs()
    scores, boxes = head(features, anchors, (8, 16, 32))
    assert scores.shape == (2, 16 * 16 + 8 * 8 + 4 * 4, 3) and boxes.shape == (2, 336, 4)
    assert ((scores > 0) & (scores < 1)).all()


def test_fam3d_without_offsets_is_the_plain_regression():
    head, features, anchors = _fam3d_inputs()
    for conv in (head.pyramid_offset, head.reg_offset):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    _, boxes = head(features, anchors, (8, 16, 32))
    assert torch.allclose(boxes, torch.cat(_plain_boxes(head, features, anchors), 1), atol=1e-3)


def test_fam3d_scale_weight_takes_the_coarser_level():
    head, features, anchors = _fam3d_inputs()
    for conv in (head.pyramid_offset, head.reg_offset):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    torch.nn.init.constant_(head.pyramid_offset.bias, 1.0)   # weight +1: everything from the next coarser level
    _, boxes = head(features, anchors, (8, 16, 32))
    plain = _plain_boxes(head, features, anchors)
    p4 = plain[1].transpose(1, 2).reshape(2, 4, 8, 8)
    upsampled = torch.nn.functional.interpolate(p4, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(boxes[:, :256], upsampled.flatten(2).transpose(1, 2), atol=1e-3)
    assert torch.allclose(boxes[:, 320:], plain[2], atol=1e-3)              # the top level has nowhere to go


def test_deform_sampling_shifts_each_coordinate_by_its_offset():
    feature = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    offset = torch.zeros(2, 8, 5, 6)
    offset[:, 1] = 1.0        # channel 0: dx = +1
    offset[:, 2] = 1.0        # channel 1: dy = +1
    out = deform_sampling(feature, offset)
    assert torch.equal(out[:, 0, :, :-1], feature[:, 0, :, 1:]) and (out[:, 0, :, -1] == 0).all()
    assert torch.equal(out[:, 1, :-1], feature[:, 1, 1:]) and torch.equal(out[:, 2:], feature[:, 2:])


# ------------------------------------------------------------------ box-aware augmentation
def _rectangle_image(rng):
    h, w = rng.randint(120, 200), rng.randint(120, 200)
    x0, y0 = rng.randint(20, w // 2), rng.randint(20, h // 2)
    x1, y1 = rng.randint(x0 + 20, w - 10), rng.randint(y0 + 20, h - 10)
    image = np.zeros((h, w, 3), np.uint8)
    image[y0:y1, x0:x1] = 255
    return image, np.array([[x0, y0, x1, y1]], np.float32)


def _white_extent(view):
    ys, xs = np.nonzero(view[..., 0] > 200)  # the white rectangle; fill (125) and erased patches are below
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.fixture
def geometry_only(monkeypatch):
    """Colour ops (solarize, brightness) and erasing would hide the white rectangle; they move no box."""
    monkeypatch.setattr(transforms, "_colour_op", lambda image, rng: image)
    monkeypatch.setattr(transforms, "_erase", lambda image, rng: image)


@pytest.mark.parametrize("kind", [LABELED, WEAK, STRONG])
def test_boxes_follow_the_image(kind, geometry_only):
    augment = Augment(kind, short_side=(96, 160), max_long_side=200)
    for seed in range(12):
        image, boxes = _rectangle_image(random.Random(seed))
        view, moved, _ = augment(image, boxes, random.Random(seed))
        assert np.abs(_white_extent(view) - moved[0]).max() <= 2.0, (seed, _white_extent(view), moved[0])
        assert (moved[:, 2] <= view.shape[1]).all() and (moved[:, 3] <= view.shape[0]).all()


def test_strong_view_keeps_boxes_with_colour_and_erasing():
    image, boxes = _rectangle_image(random.Random(0))
    augment = Augment(STRONG, short_side=(96, 160), max_long_side=200)
    for seed in range(5):
        view, moved, matrix = augment(image, boxes, random.Random(seed))
        h, w = image.shape[:2]
        corners = np.array([[0, 0, 1], [w, h, 1.0]]) @ matrix.T
        assert view.dtype == np.uint8 and moved.shape == (1, 4) and np.isfinite(corners).all()


def test_weak_to_strong_matrix_moves_teacher_boxes_onto_the_student_view(geometry_only):
    rng = random.Random(3)
    image, boxes = _rectangle_image(rng)
    weak_view, weak_boxes, weak_m = Augment(WEAK, (96, 160), 200)(image, boxes, random.Random(1))
    strong_view, strong_boxes, strong_m = Augment(STRONG, (96, 160), 200)(image, boxes, random.Random(2))
    moved = transform_boxes_torch(torch.from_numpy(weak_boxes), torch.from_numpy(strong_m @ np.linalg.inv(weak_m))
                                  .float(), strong_view.shape[0], strong_view.shape[1])
    # the enclosing box of a rotated enclosing box can only grow; otherwise it is the same box
    assert (moved[0, :2] <= torch.from_numpy(strong_boxes[0, :2]) + 1e-3).all()
    assert (moved[0, 2:] >= torch.from_numpy(strong_boxes[0, 2:]) - 1e-3).all()
    assert np.abs(_white_extent(strong_view) - strong_boxes[0]).max() <= 2.0


# ------------------------------------------------------------------ metric
def test_map_wrapper_matches_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gts = [([[10, 10, 60, 60], [100, 100, 110, 112], [20, 150, 220, 300]], [0, 1, 0]),
           ([[5, 5, 50, 40], [60, 60, 200, 220]], [1, 0])]
    preds = [([[12, 8, 62, 58], [98, 101, 111, 110], [30, 160, 200, 290], [0, 0, 30, 30]], [0.9, 0.6, 0.8, 0.3],
              [0, 1, 0, 1]),
             ([[5, 8, 50, 44], [70, 60, 190, 230], [60, 60, 120, 120]], [0.7, 0.95, 0.4], [1, 0, 0])]
    metric = mean_average_precision()
    for (gb, gl), (pb, ps, pl) in zip(gts, preds):
        metric.update([{"boxes": torch.tensor(pb, dtype=torch.float32), "scores": torch.tensor(ps),
                        "labels": torch.tensor(pl)}],
                      [{"boxes": torch.tensor(gb, dtype=torch.float32), "labels": torch.tensor(gl)}])
    ours = map_metrics(metric)

    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in range(2)], "categories": [{"id": 0}, {"id": 1}],
                    "annotations": [{"id": len(gts) * 10 + i * 10 + j, "image_id": i, "category_id": c,
                                     "bbox": xywh(b), "area": xywh(b)[2] * xywh(b)[3], "iscrowd": 0}
                                    for i, (gb, gl) in enumerate(gts) for j, (b, c) in enumerate(zip(gb, gl))]}
    coco.createIndex()
    dets = coco.loadRes([{"image_id": i, "category_id": c, "bbox": xywh(b), "score": s}
                         for i, (pb, ps, pl) in enumerate(preds) for b, s, c in zip(pb, ps, pl)])
    evaluator = COCOeval(coco, dets, "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    reference = dict(zip(["mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large"], evaluator.stats[:6]))
    assert ours == pytest.approx(reference, abs=1e-4)


# ------------------------------------------------------------------ data
def test_collate_pads_to_32_and_keeps_variable_box_counts():
    items = [{"idx": 0, "image": torch.ones(3, 50, 70, dtype=torch.uint8), "boxes": torch.zeros(2, 4),
              "labels": torch.zeros(2, dtype=torch.long)},
             {"idx": 1, "image": torch.ones(3, 65, 40, dtype=torch.uint8), "boxes": torch.zeros(0, 4),
              "labels": torch.zeros(0, dtype=torch.long)}]
    batch = collate(items)
    assert batch["image"].shape == (2, 3, 96, 96)
    assert batch["image_size"].tolist() == [[50, 70], [65, 40]]
    assert [len(b) for b in batch["boxes"]] == [2, 0] and batch["idx"].tolist() == [0, 1]
    assert batch["image"][1, :, 65:].sum() == 0 and batch["image"][1, :, :65, :40].all()


def test_raccoon_split_is_the_official_rule():
    train, test, classes = load_detection_set("raccoon")
    assert (len(train), len(test), classes) == (160, 40, ("raccoon",))
    chosen = labeled_split(160, 20, fold=1)
    np.random.seed(1)  # tools/dataset/semi_coco.py, by hand
    assert chosen.tolist() == sorted(np.random.choice(range(160), size=32, replace=False).tolist())
    dm = DetectionSemiDataModule(dataset="raccoon", labeled_percent=20)
    dm.setup()
    assert len(dm.labeled) == 32 and len(dm.unlabeled) == 128
    assert not {r.path for r in dm.labeled} & {r.path for r in dm.unlabeled}


def test_missing_coco_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ZOO_SHARED_DATA", str(tmp_path))
    with pytest.raises(MissingDatasetError, match="instances_train2017.json"):
        load_detection_set("coco2017")


# ------------------------------------------------------------------ module and smoke runs
def _module_and_batch(**kwargs):
    torch.manual_seed(0)
    network = Detector(1, backbone="small", width=8, fpn_channels=32, stacked_convs=1, num_levels=3)
    module = ConsistentTeacher(network, unsup_warmup_steps=0, panel_every_n_steps=0, **kwargs)
    torch.nn.init.zeros_(module.teacher.head.cls_out.bias)  # a confident teacher, so that pseudo-boxes exist
    dm = DetectionSemiDataModule(dataset="raccoon", labeled_percent=20, batch_size=2, uratio=2, steps_per_epoch=1,
                                 train_short_side=(96, 128), max_long_side=160, num_workers=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    return module, dm.on_after_batch_transfer(batch, 0)


@pytest.mark.parametrize("gmm", [True, False])
def test_teacher_never_receives_gradients(gmm):
    module, batch = _module_and_batch(gmm_threshold=gmm, adaptive_assignment=gmm)
    pseudo_boxes, _, _ = module.pseudo_boxes(batch["ulb"])
    assert sum(len(b) for b in pseudo_boxes) > 0
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.network.parameters())
    if gmm:
        assert (module.score_queue > 0).any()   # the GMM's score queue was fed


def test_ema_decay_warms_up_like_the_official_hook():
    module = ConsistentTeacher(Detector(1, backbone="small", width=8, fpn_channels=32, num_levels=3))
    assert [module.ema_decay_at(k) for k in (0, 1, 8)] == [0.5, pytest.approx(2 / 3), 0.9]
    assert module.ema_decay_at(10**6) == 0.9995


@pytest.mark.parametrize("config", ["consistent_teacher_raccoon"])
def test_smoke_with_unlabeled_loss(config, tmp_path):
    """The sweep's 3 steps stop before the unsupervised warm-up; here the unlabeled branch runs from step 0."""
    cli = build(ROOT / "experiments" / f"{config}.yaml", tmp_path, "--model.init_args.unsup_warmup_steps=0",
                "--data.init_args.batch_size=2")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logged = cli.trainer.logged_metrics
    assert {"train/unsup_cls_loss", "train/pseudo_boxes_per_image", "val/mAP", "val/mAP50"} <= set(logged)
    assert all(math.isfinite(float(logged[k])) for k in ("train/loss", "train/unsup_cls_loss"))
