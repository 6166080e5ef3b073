"""SLA (zoo/sla): the joint-label objective, the three inference rules and self-distillation, against the official
code run on fixed inputs.

Golden numbers: ``hankook/SLA`` at commit bc5d9cd (``trainers.create_sla_trainer`` and ``create_sla_sd_trainer``
with ``augmentations.rotation`` / ``color_perm``, run on CPU through pytorch-ignite 0.5.5 with ``device=None``) on
the fixed images, labels and network below: a linear feature layer + tanh (5 features), the joint head, and for
SLA+SD the single head, every parameter ``0.3 cos(0.7 (i+1) k)`` for the i-th parameter tensor, element k.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.nets import CifarResNet
from zoo.sla.module import SLA, TRANSFORMATIONS, aggregated_logits, expand_batch, joint_labels, single_logits

B, C, H, N = 3, 3, 4, 3
IMAGES = torch.sin(torch.arange(B * C * H * H, dtype=torch.float64)).float().view(B, C, H, H)
LABELS = torch.tensor([2, 0, 1])

GOLDEN = {  # transformation: official outputs
    "rotation": dict(
        sla_loss=2.568608283996582, large_loss=10.274433135986328, sd_loss_t2=4.008779525756836,
        single=[0.7436053156852722, -0.4034915864467621, -0.3473778963088989, -0.23157763481140137,
                0.5241296291351318, -0.11426465213298798, 0.6476202011108398, 0.24774432182312012,
                -0.7723623514175415],
        agg=[0.1327275037765503, -0.029332786798477173, -0.0540478490293026, -0.09263760596513748,
             0.12417995184659958, 0.0485115684568882, 0.08679430186748505, 0.10010926425457001,
             -0.11166447401046753]),
    "color_perm": dict(
        sla_loss=2.958408832550049, large_loss=17.75045394897461, sd_loss_t2=4.40859317779541,
        single=[0.7436053156852722, 0.35154348611831665, 0.3494093716144562, -0.23157763481140137,
                -0.7080443501472473, -0.7646956443786621, 0.6476202011108398, 0.14500759541988373,
                0.03814855217933655],
        agg=[0.13806524872779846, 0.16893112659454346, 0.1654493361711502, -0.3312329649925232,
             -0.3715697228908539, -0.43100836873054504, 0.3658085763454437, 0.30756527185440063,
             0.2110639065504074]),
}


class TinyNet(nn.Module):
    """The golden network: ``features`` = tanh(linear(flatten)), ``classifier`` = the joint head."""

    def __init__(self, joint_outputs: int):
        super().__init__()
        self.f = nn.Linear(C * H * H, 5)
        self.classifier = nn.Linear(5, joint_outputs)
        self.num_features = 5

    def features(self, x):
        return torch.tanh(self.f(x.flatten(1)))

    def forward(self, x):
        return self.classifier(self.features(x))


def golden_sla(transformation: str, **kwargs) -> SLA:
    m = len(TRANSFORMATIONS[transformation])
    model = SLA(TinyNet(N * m), num_classes=N, transformation=transformation, **kwargs)
    params = [*model.network.parameters(), *(model.single_head.parameters() if model.single_head else [])]
    for i, p in enumerate(params):  # the official parameter order: features, joint head, single head
        p.data = 0.3 * torch.cos(torch.arange(p.numel(), dtype=torch.float64) * (i + 1) * 0.7).float().view_as(p)
    return model


@pytest.mark.parametrize("transformation", sorted(GOLDEN))
def test_losses_and_inference_match_the_official_trainers(transformation):
    gold = GOLDEN[transformation]
    sla = golden_sla(transformation)
    assert sla.losses(IMAGES, LABELS)["loss"].detach().item() == pytest.approx(gold["sla_loss"], rel=1e-6)
    predictions = sla.predictions(IMAGES)
    torch.testing.assert_close(predictions["si"].flatten(), torch.tensor(gold["single"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(predictions["ag"].flatten(), torch.tensor(gold["agg"]), rtol=1e-5, atol=1e-6)
    large = golden_sla(transformation, large_loss=True).losses(IMAGES, LABELS)["loss"].detach()
    assert large.item() == pytest.approx(gold["large_loss"], rel=1e-6)
    distilled = golden_sla(transformation, self_distillation=True, temperature=2.0).losses(IMAGES, LABELS)
    assert distilled["loss"].detach().item() == pytest.approx(gold["sd_loss_t2"], rel=1e-6)


def test_joint_labels_follow_the_sample_major_expanded_batch():
    transforms = TRANSFORMATIONS["rotation"]
    expanded = expand_batch(IMAGES, transforms)
    labels = joint_labels(LABELS, 4)
    for i in range(B):
        for t in range(4):
            torch.testing.assert_close(expanded[i * 4 + t], torch.rot90(IMAGES[i], t, (1, 2)))
            assert labels[i * 4 + t] == LABELS[i] * 4 + t


def test_aggregation_averages_the_logit_of_class_y_under_transform_t_on_the_t_th_image():
    joint = torch.randn(2 * 4, 3 * 4)
    expected = torch.stack([sum(joint[i * 4 + t, y * 4 + t] for t in range(4)) / 4 for i in range(2)
                            for y in range(3)]).view(2, 3)
    torch.testing.assert_close(aggregated_logits(joint, 4), expected)
    torch.testing.assert_close(single_logits(joint, 4), joint[[0, 4]][:, [0, 4, 8]])


def test_the_identity_transformation_is_plain_cross_entropy():
    sla = golden_sla("identity")
    plain = F.cross_entropy(sla.network(IMAGES), LABELS)
    assert sla.losses(IMAGES, LABELS)["loss"].detach().item() == pytest.approx(plain.detach().item(), rel=1e-6)
    torch.testing.assert_close(sla(IMAGES), sla.network(IMAGES))


def test_the_distillation_teacher_is_detached():
    """Only the single head (and the shared features) learn from the KL term; the joint head, whose aggregation is
    the teacher, gets no gradient from it."""
    sla = golden_sla("rotation", self_distillation=True)
    sla.losses(IMAGES, LABELS)["distillation_loss"].backward()
    assert sla.network.classifier.weight.grad is None or not sla.network.classifier.weight.grad.any()
    assert sla.single_head.weight.grad.abs().sum() > 0


def test_a_head_of_the_wrong_size_is_a_clear_error():
    with pytest.raises(ValueError, match="needs num_classes x M = 10 x 4 = 40"):
        SLA(CifarResNet(num_classes=10, depth=8), num_classes=10)
    with pytest.raises(ValueError, match="unknown transformation"):
        SLA(CifarResNet(num_classes=40, depth=8), num_classes=10, transformation="rotate")
    with pytest.raises(ValueError, match="needs self_distillation"):
        SLA(CifarResNet(num_classes=40, depth=8), num_classes=10, inference="single_head")


def test_cifar_resnet_32_is_the_papers_network():
    """ResNet-32 of He et al. (option-A shortcuts): the official ``cresnet32`` has 464,154 parameters for 10 classes
    (counted from hankook/SLA models/cifar_resnet.py)."""
    net = CifarResNet(num_classes=10, depth=32)
    assert sum(p.numel() for p in net.parameters()) == 464_154
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
