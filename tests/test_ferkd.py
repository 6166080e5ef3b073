"""FerKD (zoo/ferkd): the soft-label store, the stored crops the student receives, the crop partition and its
targets, SelfMix, and the soft cross-entropy.

Golden numbers: ``szq0214/FKD`` at commit afd5294 (``FKD/FKD_SLG/generate_soft_label.label_quantization`` and
``FKD/utils_FKD.Recover_soft_label`` with ``'marginal_smoothing_k5'``, ``FKD/utils_FKD.Soft_CrossEntropy``), run on
CPU on the fixed probabilities and logits below. FerKD's own adaptation and SelfMix code is not public: the
partition, calibrated targets and SelfMix are checked against the paper's rule written out independently here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from zoo.ferkd.data import SoftLabelDataModule
from zoo.ferkd.module import CALIBRATE, DISCARD, TEACHER, FerKD, crop_targets, partition_crops, selfmix, \
    soft_cross_entropy
from zoo.ferkd.store import build_store, crop_view, load_store, recover_soft_label, sample_crop_boxes, save_store, \
    topk_quantise

C = 8
PROBS = torch.softmax(torch.sin(torch.arange(3 * C, dtype=torch.float64) * 1.3).float().view(3, C) * 3, dim=1)
LOGITS = torch.cos(torch.arange(3 * C, dtype=torch.float64) * 0.7).float().view(3, C) * 2
GOLDEN_INDEX = [[6, 1, 2, 7, 5], [3, 7, 2, 4, 6], [0, 5, 4, 1, 6]]
GOLDEN_VALUE = [[0.4131176173686981, 0.3719564974308014, 0.09698986262083054, 0.053806670010089874, 0.03938804194331169],
                [0.6272941827774048, 0.1998804658651352, 0.11461757123470306, 0.044896550476551056, 0.005294145084917545],
                [0.41037803888320923, 0.30268022418022156, 0.24922813475131989, 0.018261287361383438,
                 0.009687858633697033]]
GOLDEN_RECOVERED = [
    [0.00824709702283144, 0.3719564974308014, 0.09698986262083054, 0.00824709702283144, 0.00824709702283144,
     0.03938804194331169, 0.4131176173686981, 0.053806670010089874],
    [0.002672354457899928, 0.002672354457899928, 0.11461757123470306, 0.6272941827774048, 0.044896550476551056,
     0.002672354457899928, 0.005294145084917545, 0.1998804658651352],
    [0.41037803888320923, 0.018261287361383438, 0.0032548110466450453, 0.0032548110466450453, 0.24922813475131989,
     0.30268022418022156, 0.009687858633697033, 0.0032548110466450453]]
GOLDEN_SOFT_CE = {1.0: 2.842038869857788, 2.0: 2.275890827178955}  # temperature: Soft_CrossEntropy()(z / T, q)


def standin_teacher() -> nn.Module:
    """A fixed linear teacher on 32x32 RGB inputs (digits), so the stored labels can be recomputed."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


@pytest.fixture(scope="module")
def digits_module():
    dm = SoftLabelDataModule(store="absent_store.pt", dataset="digits", num_crops=4, batch_size=16,
                             discard_easiest=0.2, calibrate_hardest=0.2, steps_per_epoch=2, num_workers=0,
                             download=False, generate_missing_with=standin_teacher(), standin_crops_per_image=10)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------ official numbers
def test_quantisation_recovery_and_soft_ce_match_the_official_functions():
    index, value = topk_quantise(PROBS, 5)
    assert index.tolist() == GOLDEN_INDEX
    torch.testing.assert_close(value, torch.tensor(GOLDEN_VALUE), rtol=1e-6, atol=1e-7)
    recovered = recover_soft_label(index, value, C)
    torch.testing.assert_close(recovered, torch.tensor(GOLDEN_RECOVERED), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(recovered.sum(-1), torch.ones(3))
    for temperature, loss in GOLDEN_SOFT_CE.items():
        assert soft_cross_entropy(LOGITS, recovered, temperature).item() == pytest.approx(loss, rel=1e-6)


# ------------------------------------------------------------------------------------------------ the store
def test_crop_boxes_follow_fkd_coordinates():
    coords, flips = sample_crop_boxes(32, 48, 200, __import__("random").Random(0), scale=(0.08, 0.936))
    top, left, height, width = coords.T
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 1 + 1e-6).all() and (left + width <= 1 + 1e-6).all()
    area = height * width
    assert area.min() >= 0.06 and area.max() <= 0.97  # the area range, up to the integer rounding of the box
    assert 0.3 < flips.mean() < 0.7
    image = np.arange(32 * 48 * 3, dtype=np.int64).reshape(32, 48, 3) % 251
    image = image.astype(np.uint8)
    whole = crop_view(image, np.array([0, 0, 1, 1], np.float32), False, 32)  # (i/H, j/W, h/H, w/W): the image
    assert whole.shape == (3, 32, 32)
    box = crop_view(image, np.array([8 / 32, 12 / 48, 16 / 32, 16 / 48], np.float32), True, 16)  # no resize: pixels
    assert torch.equal(box, torch.from_numpy(image[8:24, 12:28][:, ::-1].copy()).permute(2, 0, 1))


def test_store_round_trip(tmp_path, digits_module):
    data = digits_module.data
    teacher = standin_teacher()
    store = build_store(teacher, data.x_train[:6], data.y_train[:6], digits_module.mean, digits_module.std, 7,
                        top_k=3, dataset="digits", seed=3)
    loaded = load_store(save_store(store, tmp_path / "store.pt"))
    for key in ("coords", "flips", "topk_index", "topk_value", "gt_prob"):
        assert torch.equal(loaded[key], store[key]), key
    assert loaded["coords"].shape == (6, 7, 4) and loaded["topk_index"].shape == (6, 7, 3)
    # recompute every record independently: the crop from its coordinates, the teacher's softmax, its top-3
    for image in range(6):
        crops = torch.stack([crop_view(data.x_train[image], c, f, 32)
                             for c, f in zip(loaded["coords"][image].numpy(), loaded["flips"][image].tolist())])
        probs = torch.softmax(teacher((crops.float() - digits_module.mean) / digits_module.std), -1)
        top = probs.topk(3, dim=-1)
        assert torch.equal(loaded["topk_index"][image].long(), top.indices)
        torch.testing.assert_close(loaded["topk_value"][image], top.values)
        torch.testing.assert_close(loaded["gt_prob"][image], probs[:, int(data.y_train[image])])
    same = build_store(teacher, data.x_train[:6], data.y_train[:6], digits_module.mean, digits_module.std, 7,
                       top_k=3, dataset="digits", seed=3)
    assert torch.equal(same["coords"], store["coords"]) and torch.equal(same["flips"], store["flips"])


# ------------------------------------------------------------------------------------- the student's crops
def test_the_student_receives_exactly_the_stored_crops(digits_module):
    dm = digits_module
    batch = next(iter(dm.train_dataloader()))
    num_images = len(batch["idx"])
    assert num_images == 16 // 4 and len(batch["image"]) == 16
    store = dm.store
    for row in range(16):
        image, crop = int(batch["idx"][row // 4]), int(batch["crop"][row])
        expected = crop_view(dm.data.x_train[image], store["coords"][image, crop].numpy(),
                             bool(store["flips"][image, crop]), 32)
        assert torch.equal(batch["image"][row], expected)
        assert torch.equal(batch["soft_index"][row], store["topk_index"][image, crop].long())
        assert torch.equal(batch["soft_value"][row], store["topk_value"][image, crop])
        assert int(batch["label"][row]) == int(dm.data.y_train[image])
        kinds = partition_crops(store["gt_prob"][image : image + 1], 0.2, 0.2)[0]
        assert kinds[crop] != DISCARD and bool(batch["calibrated"][row]) == (kinds[crop] == CALIBRATE)
    for group in batch["crop"].view(num_images, 4):  # without replacement within a load, as FKD's randperm
        assert len(set(group.tolist())) == 4
    # the teacher, run on the crops the student got, gives back the stored labels
    probs = torch.softmax(standin_teacher()((batch["image"].float() - dm.mean) / dm.std), -1)
    assert torch.equal(probs.topk(5, dim=-1).indices, batch["soft_index"])


def test_a_missing_store_or_one_for_other_images_is_a_clear_error(tmp_path, digits_module):
    with pytest.raises(FileNotFoundError, match="zoo.ferkd.generate"):
        SoftLabelDataModule(store=str(tmp_path / "none.pt"), dataset="digits", download=False).setup("fit")
    data = digits_module.data
    labels = data.y_train.copy()
    labels[0] = (labels[0] + 1) % 10  # one label differs: another training set
    store = build_store(standin_teacher(), data.x_train, labels, digits_module.mean, digits_module.std, 5,
                        dataset="digits")
    path = save_store(store, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="made for other images"):
        SoftLabelDataModule(store=str(path), dataset="digits", num_crops=2, batch_size=4, download=False).setup("fit")


# ------------------------------------------------------------------------------------- FerKD's adaptation
def test_partition_discards_the_easiest_and_calibrates_the_hardest():
    gt_prob = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.3, 0.05, 0.95, 0.6, 0.2, 0.4],
                            [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    kinds = partition_crops(gt_prob, discard_easiest=0.2, calibrate_hardest=0.3)
    # the paper's rule by hand: rank by p(true class); top 2 of 10 discarded, bottom 3 calibrated, ties by crop order
    expected = []
    for row in gt_prob.tolist():
        order = sorted(range(10), key=lambda c: (-row[c], c))
        kind = [TEACHER] * 10
        for c in order[:2]:
            kind[c] = DISCARD
        for c in order[-3:]:
            kind[c] = CALIBRATE
        expected.append(kind)
    assert kinds.tolist() == expected
    assert kinds[0].tolist() == [DISCARD, CALIBRATE, TEACHER, TEACHER, TEACHER, CALIBRATE, DISCARD, TEACHER,
                                 CALIBRATE, TEACHER]
    assert (partition_crops(gt_prob, 0.0, 0.0) == TEACHER).all()  # plain FKD
    with pytest.raises(ValueError, match="leave no"):
        partition_crops(gt_prob, 0.5, 0.5)


def test_targets_calibrated_crops_get_the_smoothed_ground_truth():
    labels = torch.tensor([2, 5, 1])
    index, value = topk_quantise(PROBS, 5)
    calibrated = torch.tensor([True, False, True])
    targets = crop_targets(labels, index, value, calibrated, C, smoothing=0.1, source="teacher")
    for row in (0, 2):
        expected = torch.full((C,), 0.1 / C)
        expected[labels[row]] += 0.9
        torch.testing.assert_close(targets[row], expected)
    torch.testing.assert_close(targets[1], recover_soft_label(index, value, C)[1])
    hard = crop_targets(labels, index, value, calibrated, C, smoothing=0.1, source="hard")
    assert torch.equal(hard, torch.eye(C)[labels])


def test_selfmix_mixes_crops_of_the_same_image_with_consistent_labels():
    n, images = 4, 3
    crops = torch.arange(n * images, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    targets = torch.eye(n * images)  # each crop's label names the crop: the mixed label must name its pixels
    generator = torch.Generator().manual_seed(0)
    for lam in (0.3, 0.7, 0.95):
        mixed, mixed_targets, partner = selfmix(crops, targets, n, lam, generator)
        assert ((partner // n) == torch.arange(n * images) // n).all()  # same image
        assert (partner != torch.arange(n * images)).all()  # another crop
        for row in range(n * images):
            own = (mixed[row, 0] == row).float().mean()
            theirs = (mixed[row, 0] == partner[row]).float().mean()
            assert own + theirs == 1
            assert mixed_targets[row, row] == pytest.approx(float(own)) and \
                mixed_targets[row, int(partner[row])] == pytest.approx(float(theirs))
        torch.testing.assert_close(mixed_targets.sum(-1), torch.ones(n * images))
    with pytest.raises(ValueError, match="crops per image"):
        selfmix(crops, targets, 1, 0.5)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="multiple of num_crops"):
        SoftLabelDataModule(store="x.pt", num_crops=4, batch_size=10)
    with pytest.raises(ValueError, match="target_source"):
        FerKD(nn.Linear(2, 2), target_source="teacher_free")
