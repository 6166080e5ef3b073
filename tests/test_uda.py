"""UDA parity: losses, masks, TSA and the strong view against numbers produced by running the official code.

Google: google-research/uda @ 960684e363251772a5938451d4d2bc0f1da9e24b, ``image/main.py`` executed unchanged under
TensorFlow 2.21 ``tf.compat.v1`` (graph mode; ``tf.contrib`` and the TPU estimator spec mocked). Its
``_kl_divergence_with_logits``, ``get_tsa_threshold`` and ``anneal_sup_loss`` were called directly, and its whole
``model_fn`` was run in TRAIN mode with ``build_model`` replaced by the fixed logits below (+ 0 * a variable), the
metrics read from its logging hook. ``image/randaugment/augmentation_transforms.py`` ops were run on a real
CIFAR-10 image (``TransformT.xform`` at level 7, random sign forced by patching ``random.random``, then the
official ``pil_unwrap`` and de-normalisation).

USB: microsoft/Semi-supervised-learning @ 1ef4cbebcc0b368158315aeb425053858cf6c845,
``semilearn/algorithms/uda/uda.py::UDA.train_step`` and ``UDA.TSA``, ``PseudoLabelingHook.gen_ulb_targets`` and
``FixedThresholdingHook.masking``, run unchanged on an object carrying ``AlgorithmBase``'s own methods and a model
returning the fixed logits (third-party imports semilearn never calls here were stubbed).

USB deviates from the paper in two places that these constants pin down: its ``train_step`` ignores T (its targets
equal the un-sharpened softmax; its unsup loss, 0.458232, is soft-target CE against those), and its TSA keeps a
labeled sample iff the *max* probability is <= eta_t and averages over the whole batch. We follow the paper and
Google; the sharpened targets come from USB's hook on its ``softmax=True`` path (USB < 0.3.0 called it that way).
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from zoo.core.datasets import load_image_set
from zoo.uda.module import (UDA, confidence_mask, kl_consistency_loss, sharpened_targets, tsa_supervised_loss,
                            tsa_threshold)
from zoo.uda.views import UDA_OPS, UDAStrongView, centred_cutout

# fixed inputs, K = 5 classes
LOGITS_LB = torch.tensor([[4.0, 0.0, 0.0, 0.0, 0.0],    # correct and confident: TSA drops it
                          [4.0, 0.0, 0.0, 0.0, 0.0],    # confidently wrong (label 2): Google keeps it, USB drops it
                          [0.5, 0.2, -0.3, 0.1, 0.0],   # unsure: kept
                          [1.0, 2.0, 0.5, -1.0, 0.3]])  # correct, p = 0.548
LABELS_LB = torch.tensor([0, 2, 1, 1])
LOGITS_WEAK = torch.tensor([[3.0, 0.5, 0.0, -0.5, 0.2], [0.2, 1.5, 0.3, 0.0, -0.2],
                            [-1.0, 0.0, 5.0, 1.0, 0.0], [0.8, 0.7, 0.6, 0.9, 0.5]])
LOGITS_STRONG = torch.tensor([[1.0, 0.8, -0.2, 0.3, 0.0], [0.0, 0.5, 1.0, 0.2, -0.4],
                              [0.3, -0.5, 2.0, 0.9, 0.1], [2.0, 0.1, 0.0, -1.0, 0.4]])

# USB PseudoLabelingHook.gen_ulb_targets(LOGITS_WEAK, use_hard_label=False, T=0.4, softmax=True)
USB_SHARPENED_T04 = [[0.9964587092399597, 0.0019236179068684578, 0.0005511257331818342, 0.00015790016914252192,
                      0.0009086527279578149],
                     [0.034424860030412674, 0.8878288269042969, 0.04420239478349686, 0.020879732444882393,
                      0.012664197944104671],
                     [3.0588606136916496e-07, 3.7264551338012097e-06, 0.9999468326568604, 4.539751898846589e-05,
                      3.7264551338012097e-06],
                     [0.241445392370224, 0.18803787231445312, 0.14644403755664825, 0.3100220263004303,
                      0.1140507310628891]]
USB_MASK_08 = [1.0, 0.0, 1.0, 0.0]  # FixedThresholdingHook.masking, p_cutoff 0.8 (Google's high_prob_ratio: 0.5)
# Google _kl_divergence_with_logits(LOGITS_WEAK / 0.4, LOGITS_STRONG), per example
GOOGLE_KL_SHARPENED = [1.0680148601531982, 0.9993911385536194, 0.557481050491333, 0.6428952813148499]
# Google get_tsa_threshold(schedule, t, 1000, 1/K, 1) at t = 0, 250, 500, 1000 (USB's UDA.TSA agrees to 1e-7)
GOOGLE_TSA = {"linear": {5: [0.2, 0.4, 0.6, 1.0], 10: [0.1, 0.325, 0.55, 1.0]},
              "log": {5: [0.2, 0.7707961797714233, 0.934332013130188, 0.9946096539497375],
                      10: [0.1, 0.7421456575393677, 0.9261234998703003, 0.9939358234405518]},
              "exp": {5: [0.20539036393165588, 0.2188141942024231, 0.26566800475120544, 1.0],
                      10: [0.10606415569782257, 0.12116597592830658, 0.17387649416923523, 1.0]}}
# Google anneal_sup_loss, linear schedule, step 300 of 1000, K = 5 (eta = 0.44): masked per-sample CE and average
GOOGLE_TSA_PER_SAMPLE = [0.0, 4.070703029632568, 1.5432889461517334, 0.0]
GOOGLE_TSA_LOSS = 2.8069958686828613
# Google model_fn at step 300 of 1000, T 0.4, threshold 0.8: metrics from its logging hook
GOOGLE_MODEL_FN = {"none": {"sup/sup_loss": 1.571360468864441, "unsup/loss": 0.4063739776611328,
                            "training/loss": 1.9777344465255737},
                   "linear": {"sup/sup_loss": 2.8069958686828613, "unsup/loss": 0.4063739776611328,
                              "training/loss": 3.213369846343994, "sup/sup_trained_ratio": 0.5}}
# USB UDA.train_step on the same logits (it = 300 of 1000): what the deviations amount to
USB_TRAIN_STEP = {"none": {"sup_loss": 1.571360468864441, "unsup_loss": 0.45823144912719727},
                  "linear": {"sup_loss": 0.38582223653793335, "unsup_loss": 0.45823144912719727}}


def test_sharpened_targets_match_usb_hook():
    torch.testing.assert_close(sharpened_targets(LOGITS_WEAK, 0.4), torch.tensor(USB_SHARPENED_T04),
                               atol=1e-7, rtol=1e-5)


def test_confidence_mask_uses_unsharpened_probabilities():
    assert confidence_mask(LOGITS_WEAK, 0.8).tolist() == USB_MASK_08
    # thresholding the sharpened targets instead would also pass row 1 (0.888 after sharpening)
    assert confidence_mask(LOGITS_WEAK / 0.4, 0.8).tolist() != USB_MASK_08
    assert confidence_mask(LOGITS_WEAK, 0.0).tolist() == [1.0] * 4
    # a tie: softmax([0, 0]) is exactly 0.5; Google's tf.greater masks it out (USB's ``ge`` would keep it)
    assert confidence_mask(torch.zeros(1, 2), 0.5).tolist() == [0.0]


def test_kl_consistency_matches_google():
    targets = sharpened_targets(LOGITS_WEAK, 0.4)
    per_sample = [float(kl_consistency_loss(LOGITS_STRONG[i:i + 1], targets[i:i + 1], torch.ones(1)))
                  for i in range(4)]
    np.testing.assert_allclose(per_sample, GOOGLE_KL_SHARPENED, rtol=1e-5)
    loss = kl_consistency_loss(LOGITS_STRONG, targets, confidence_mask(LOGITS_WEAK, 0.8))
    assert float(loss) == pytest.approx(GOOGLE_MODEL_FN["none"]["unsup/loss"], rel=1e-5)


def test_kl_consistency_passes_gradient_to_the_strong_view_only():
    weak, strong = LOGITS_WEAK.clone().requires_grad_(), LOGITS_STRONG.clone().requires_grad_()
    kl_consistency_loss(strong, sharpened_targets(weak, 0.4), torch.ones(4)).backward()
    assert weak.grad is None and strong.grad.abs().sum() > 0


@pytest.mark.parametrize("schedule", ["linear", "log", "exp"])
@pytest.mark.parametrize("num_classes", [5, 10])
def test_tsa_threshold_matches_google(schedule, num_classes):
    ours = [tsa_threshold(schedule, t / 1000, num_classes) for t in (0, 250, 500, 1000)]
    np.testing.assert_allclose(ours, GOOGLE_TSA[schedule][num_classes], rtol=1e-6)
    assert tsa_threshold("none", 0.3, num_classes) == 1.0


def test_tsa_supervised_loss_follows_google_rule():
    loss, keep = tsa_supervised_loss(LOGITS_LB, LABELS_LB, tsa_threshold("linear", 0.3, 5))
    assert keep.tolist() == [0.0, 1.0, 1.0, 0.0]  # the confidently wrong sample is kept, not dropped as in USB
    per_sample = torch.nn.functional.cross_entropy(LOGITS_LB, LABELS_LB, reduction="none") * keep
    np.testing.assert_allclose(per_sample.tolist(), GOOGLE_TSA_PER_SAMPLE, rtol=1e-6)
    assert float(loss) == pytest.approx(GOOGLE_TSA_LOSS, rel=1e-6)
    # USB's rule (max prob <= eta, mean over the batch) gives a different number on the same logits
    assert float(loss) != pytest.approx(USB_TRAIN_STEP["linear"]["sup_loss"], rel=1e-2)
    # a tie: Google drops a sample only when its correct-class probability is strictly greater (tf.greater)
    assert tsa_supervised_loss(torch.zeros(1, 2), torch.tensor([0]), 0.5)[1].tolist() == [1.0]
    # nothing above threshold 1: the plain mean cross-entropy, Google's no-TSA branch
    assert float(tsa_supervised_loss(LOGITS_LB, LABELS_LB, 1.0)[0]) == pytest.approx(
        GOOGLE_MODEL_FN["none"]["sup/sup_loss"], rel=1e-6)


def test_usb_unsup_loss_is_ours_without_sharpening_plus_target_entropy():
    """Reproduces USB's number from our pieces with T = 1 and CE = KL + H(target): the gap to Google is T only."""
    probs, mask = torch.softmax(LOGITS_WEAK, -1), confidence_mask(LOGITS_WEAK, 0.8)
    entropy = -(probs * probs.log()).sum(-1)
    usb_like = kl_consistency_loss(LOGITS_STRONG, sharpened_targets(LOGITS_WEAK, 1.0), mask) + (entropy * mask).mean()
    assert float(usb_like) == pytest.approx(USB_TRAIN_STEP["none"]["unsup_loss"], rel=1e-5)


class FixedLogits(nn.Module):
    """Returns the fixed labeled / weak / strong logits whatever the input (plus 0 * a parameter)."""

    def __init__(self):
        super().__init__()
        self.zero = nn.Parameter(torch.zeros(()))
        self.classifier = nn.Linear(1, 5)

    def forward(self, x):
        return torch.cat([LOGITS_LB, LOGITS_WEAK, LOGITS_STRONG]) + 0.0 * self.zero


@pytest.mark.parametrize("schedule", ["none", "linear"])
def test_training_step_matches_google_model_fn(schedule):
    model = UDA(FixedLogits(), temperature=0.4, threshold=0.8, tsa_schedule=schedule)
    model._trainer = SimpleNamespace(global_step=300, estimated_stepping_batches=1000)
    logged = {}
    model.log_dict = lambda metrics, **kwargs: logged.update(
        {k: float(torch.as_tensor(v).detach()) for k, v in metrics.items()})
    images = torch.zeros(4, 3, 8, 8)
    batch = {"lb": {"weak": images, "label": LABELS_LB},
             "ulb": {"weak": images, "strong": images, "label": torch.tensor([0, 1, 2, 3])}}
    loss = model.training_step(batch, 0)
    expected = GOOGLE_MODEL_FN[schedule]
    assert float(loss) == pytest.approx(expected["training/loss"], rel=1e-5)
    assert logged["train/sup_loss"] == pytest.approx(expected["sup/sup_loss"], rel=1e-5)
    assert logged["train/unsup_loss"] == pytest.approx(expected["unsup/loss"], rel=1e-5)
    assert logged["train/mask_ratio"] == 0.5
    if schedule == "linear":
        assert logged["train/sup_trained_ratio"] == expected["sup/sup_trained_ratio"]
        assert logged["train/tsa_threshold"] == pytest.approx(0.44)


# ------------------------------------------------------------------------------------------ the strong view
# Google augmentation_transforms ops at level 7 on x_train[0] of the offline CIFAR-10 subset: per-channel means and
# x / y centroids of the summed intensity; "/0.0" keeps the op's sign, "/0.9" negates it (random.random() > 0.5)
GOOGLE_OPS_LEVEL7 = {
    "Invert/0.0": [132.042, 142.4912, 153.5293, 17.6239, 15.6024],
    "Sharpness/0.0": [122.5127, 112.1133, 101.1553, 12.7914, 15.3699],
    "AutoContrast/0.0": [122.958, 112.5088, 103.8574, 12.7969, 15.3706],
    "Posterize/0.0": [90.125, 79.4375, 72.25, 11.9134, 15.2711],
    "ShearX/0.0": [122.84, 112.7829, 101.5561, 13.0043, 15.8916],
    "ShearX/0.9": [128.7628, 118.7155, 106.9868, 13.5732, 15.6783],
    "TranslateX/0.0": [112.5388, 102.5429, 91.4022, 15.0029, 16.7791],
    "TranslateX/0.9": [133.9587, 124.3583, 111.8895, 14.3427, 15.3589],
    "TranslateY/0.0": [124.1394, 116.3749, 105.9002, 13.9858, 15.3879],
    "TranslateY/0.9": [129.033, 119.9784, 108.4491, 12.7537, 16.0735],
    "ShearY/0.0": [126.63, 117.652, 106.7338, 13.3803, 15.4065],
    "ShearY/0.9": [127.047, 117.0299, 105.3872, 13.1429, 15.2565],
    "Rotate/0.0": [125.7925, 115.9848, 104.3694, 13.713, 16.7692],
    "Rotate/0.9": [124.9517, 115.0708, 103.5295, 13.2266, 15.2988],
    "Equalize/0.0": [158.9795, 158.9609, 127.3105, 13.5907, 15.7389],
    "Contrast/0.0": [122.1777, 109.5508, 98.3477, 12.1097, 15.3548],
    "Color/0.0": [125.582, 111.4092, 96.5186, 12.7971, 15.374],
    "Solarize/0.0": [79.8623, 71.3066, 63.0371, 16.5248, 16.9275],
    "Brightness/0.0": [151.9531, 139.1436, 127.4033, 13.2396, 15.6376],
}
# Google create_cutout_mask(32, 32, 3, 16) with the centre drawn as (2, 30): rows [0, 10), columns [22, 32)
GOOGLE_CUTOUT16_CENTRE_2_30 = ((0, 22), (10, 32))


class FixedDraw:
    """An rng whose draws are fixed: ``random()`` for the op's sign, ``randrange`` for Cutout centres."""

    def __init__(self, draw: float, centres=()):
        self.draw, self.centres = draw, list(centres)

    def random(self):
        return self.draw

    def randrange(self, n):
        return self.centres.pop(0)


def signature(x: np.ndarray) -> list[float]:
    x = x.astype(np.float64)
    intensity = x.sum(-1)
    ys, xs = np.mgrid[: x.shape[0], : x.shape[1]]
    return [*x.reshape(-1, 3).mean(0), (xs * intensity).sum() / intensity.sum(),
            (ys * intensity).sum() / intensity.sum()]


@pytest.fixture(scope="module")
def cifar_image():
    return load_image_set("cifar10_subset", download=False).x_train[0]


@pytest.mark.parametrize("key", sorted(GOOGLE_OPS_LEVEL7))
def test_ops_match_official_transforms(cifar_image, key):
    name, draw = key.split("/")
    out = UDAStrongView().apply(cifar_image, name, 7, FixedDraw(float(draw)))
    # filled pixels: the official code's exact mean colour vs our uint8 (125, 123, 114)
    np.testing.assert_allclose(signature(out), GOOGLE_OPS_LEVEL7[key], atol=0.08)


def test_centred_cutout_box_matches_official_mask():
    image = np.full((32, 32, 3), 7, np.uint8)
    out = centred_cutout(image, 16, FixedDraw(0.0, centres=[2, 30]), (125, 123, 114))
    rows, cols = np.nonzero((out != 7).any(-1))
    (top, left), (bottom, right) = GOOGLE_CUTOUT16_CENTRE_2_30
    assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == (top, left, bottom, right)
    assert len(rows) == (bottom - top) * (right - left)


def test_op_cutout_side_is_twice_the_level():
    out = UDAStrongView().apply(np.zeros((32, 32, 3), np.uint8), "Cutout", 4, FixedDraw(0.0, centres=[16, 16]))
    assert (out.any(-1)).sum() == 8 * 8


def test_strong_view_is_deterministic_per_seed_and_keeps_shape(cifar_image):
    view = UDAStrongView()
    a, b = view(cifar_image, random.Random(3)), view(cifar_image, random.Random(3))
    assert a.shape == cifar_image.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, view(cifar_image, random.Random(4)))
    with pytest.raises(ValueError, match="unknown UDA RandAugment ops"):
        UDAStrongView(ops=("Identity",))
    assert len(UDA_OPS) == 15
