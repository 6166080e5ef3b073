"""ITTA (zoo/itta): the learnable consistency loss, the meta step, the test-time step and the data protocol.

Golden numbers: ``liangchen527/ITTA`` at commit 106576a9e6dc421462d2bc11bb0d355f9898231d, run here on CPU
(``torchvision.models.resnet18(pretrained=True)`` replaced by the same architecture with weights from
``torch.manual_seed(0)``; the class ``ITTA`` taken out of ``algorithms.py``, whose other classes mix tabs and
spaces). Fixed weights: the ResNet-18 from seed 0, the classifier ``nn.Linear(512, 7)`` from seed 1, and g_phi
(``Adaparams``) perturbed from the identity, ``w = 1 + 0.1 N(0, 1)``, ``b = 0.1 N(0, 1)`` from seed 2. Numbers:
``Adaparams.forward``; ``ResNet_ITTA.mixstyle``; ``misc.l2_between_dicts(normalize=True)``; the loss and the
meta-penalty lines of ``ITTA.update`` (penalty and phi's gradient, on the same weights); ``ITTA.test_adapt``
followed by ``ITTA.predict`` as ``misc.accuracy_tsc`` runs them (with lr 0.05 so the step is well above float
noise). Python's ``random.seed`` 0 / 1 puts MixStyle after layer1 / layer2.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision

from zoo.itta.data import DomainGeneralizationDataModule
from zoo.itta.erm import ERM, prediction_entropy
from zoo.itta.module import ITTA, gradient_alignment_penalty
from zoo.itta.networks import AffineReLUStack, StagedResNet, mixstyle

ADAPARAMS = {"sum": 1016.8563842773438, "sq": 1265.70263671875}
MIXSTYLE = {"sum": 2185.3955078125, "abs_sum": 2191.5947265625, "first": [1.7165927, 1.6616266, 2.9604897]}
L2_NORMALISED = {"value": 1.9886670112609863,
                 "grad_w1": [-0.0386732, -0.0095152, 0.0590606, -0.0223157, -0.0779778, -0.0998504, 0.1083402,
                             -0.0012097, -0.1482863, 0.0971292, -0.191122, -0.1715894]}
UPDATE = {  # by Python seed: loss_cla, loss_reg (torch seed 10); penalty and phi's gradient (torch seed 11)
    0: dict(loss_cla=4.031006813049316, loss_reg=0.08360517770051956, penalty=0.21365530788898468,
            grad_w0=0.21251431107521057, grad_b9=0.35955795645713806, grad_norm=0.385233074426651),
    1: dict(loss_cla=4.0260701179504395, loss_reg=0.08400372415781021, penalty=0.1985204666852951,
            grad_w0=0.21464817225933075, grad_b9=0.3552933931350708, grad_norm=0.333972692489624),
}
TEST_STEP = {  # by Python seed (torch seed 12): adaptive-parameter changes after one test_adapt
    0: dict(dw1_0=-0.00022459030151367188, dw3_2_abs=0.023485124111175537, dw4_4_abs=0.000661313533782959,
            db2_0_abs=0.03465522453188896),
    1: dict(dw1_0=-0.0003064870834350586, dw3_2_abs=0.02920389175415039, dw4_4_abs=0.0009961128234863281,
            db2_0_abs=0.13520751893520355),
}
LOGITS_BEFORE_SEED0 = [0.192841, 0.004076, 0.830876, -0.268673, -2.562827, -1.624145, -0.842511]  # image 0
LOGIT_CHANGE_SEED0 = [-6.6e-06, 2.5e-06, -1.14e-05, 6.1e-06, 3.36e-05, -4.6e-06, 2.31e-05, 1.04e-05, -5.4e-06,
                      -1.74e-05, 3.8e-06, 5.41e-05, 4.5e-06, 7.3e-06, 1.91e-05, 3.1e-06, 1.2e-05, -9.5e-06, 1.1e-05,
                      5.6e-06, -2.7e-06, -3.5e-06, -1e-06, 1.2e-05, 1.1e-06, 1.62e-05, -1.85e-05, 4.52e-05]


# ------------------------------------------------------------------------------------------------- helpers
def official_weights_module(lr: float = 5e-5, image_size: int = 224) -> ITTA:
    """ITTA on a ResNet-18 holding the golden script's weights (frozen BatchNorm, as DomainBed's ResNet)."""
    network = StagedResNet(num_classes=7, name="resnet18", pretrained=False, freeze_bn=True)
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    renamed = {}
    for key, value in reference.items():
        if key.startswith("fc."):
            continue
        key = key.replace("conv1.", "stem.0.", 1) if key.startswith("conv1.") else key
        key = key.replace("bn1.", "stem.1.", 1) if key.startswith("bn1.") else key
        for i in range(1, 5):
            key = key.replace(f"layer{i}.", f"stages.{i - 1}.", 1) if key.startswith(f"layer{i}.") else key
        renamed[key] = value
    torch.manual_seed(1)
    renamed.update({f"classifier.{k}": v for k, v in torch.nn.Linear(512, 7).state_dict().items()})
    network.load_state_dict(renamed)
    module = ITTA(network, image_size=image_size, lr=lr)
    torch.manual_seed(2)
    with torch.no_grad():
        for w, b in zip(module.loss_network.weight, module.loss_network.bias):
            w.copy_(1 + 0.1 * torch.randn(512))
            b.copy_(0.1 * torch.randn(512))
    return module.train()


def small_module(cls=ITTA, **kwargs):
    torch.manual_seed(0)
    network = StagedResNet(num_classes=7, name="resnet18", pretrained=False, freeze_bn=False,
                           model_kwargs={"channels": (4, 8, 8, 8)})
    return cls(network, **kwargs)


# --------------------------------------------------------------------------------- golden: the official code
def test_loss_network_matches_official_adaparams():
    module = official_weights_module()
    torch.manual_seed(5)
    out = module.loss_network(torch.randn(4, 512))
    assert out.sum().item() == pytest.approx(ADAPARAMS["sum"], rel=1e-5)
    assert out.pow(2).sum().item() == pytest.approx(ADAPARAMS["sq"], rel=1e-5)


def test_mixstyle_matches_official():
    torch.manual_seed(6)
    h = torch.rand(5, 8, 6, 6) * 3
    torch.manual_seed(7)
    out = mixstyle(h, alpha=0.1)
    assert out.sum().item() == pytest.approx(MIXSTYLE["sum"], rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(MIXSTYLE["abs_sum"], rel=1e-5)
    assert out[0, 0, 0, :3].tolist() == pytest.approx(MIXSTYLE["first"], abs=1e-5)


def test_penalty_matches_official_normalised_l2_and_its_gradient():
    """Losses linear in parameters p with coefficients A (the 'phi') and B: their gradients are exactly the official
    dicts' tensors, so the penalty (weight 1) must be ``l2_between_dicts(normalize=True)`` and d/dA its gradient."""
    torch.manual_seed(8)
    a1, a0 = torch.randn(3, 4, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    b1, b0 = torch.randn(3, 4), torch.randn(5, 2)
    p1, p0 = torch.zeros(3, 4, requires_grad=True), torch.zeros(5, 2, requires_grad=True)
    loss_reg = (a1 * p1).sum() + (a0 * p0).sum()
    loss_cls = (b1 * p1).sum() + (b0 * p0).sum()
    penalty = gradient_alignment_penalty(loss_reg, loss_cls, [p1, p0], weight=1.0)
    assert penalty.item() == pytest.approx(L2_NORMALISED["value"], rel=1e-5)
    (grad_a1,) = torch.autograd.grad(penalty, [a1])
    assert grad_a1.flatten().tolist() == pytest.approx(L2_NORMALISED["grad_w1"], abs=1e-6)


@pytest.mark.parametrize("python_seed", [0, 1])
def test_training_losses_and_meta_penalty_match_official_update(python_seed):
    module = official_weights_module()
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    y = torch.arange(6)
    expected = UPDATE[python_seed]
    random.seed(python_seed)
    torch.manual_seed(10)
    loss_cls, loss_reg = module.losses(x, y)
    assert loss_cls.item() == pytest.approx(expected["loss_cla"], rel=1e-5)
    assert loss_reg.item() == pytest.approx(expected["loss_reg"], rel=1e-5)
    random.seed(python_seed)
    torch.manual_seed(11)
    penalty = module.meta_penalty(x, y)
    assert penalty.item() == pytest.approx(expected["penalty"], rel=1e-4)
    phi = list(module.loss_network.parameters())
    grads = torch.autograd.grad(penalty, phi)
    assert grads[0].sum().item() == pytest.approx(expected["grad_w0"], rel=1e-3)
    assert grads[10 + 9].sum().item() == pytest.approx(expected["grad_b9"], rel=1e-3)  # ParameterLists: weights, then biases
    assert torch.cat([g.flatten() for g in grads]).norm().item() == pytest.approx(expected["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("python_seed", [0, 1])
def test_test_time_step_matches_official_test_adapt(python_seed):
    module = official_weights_module(lr=0.05).eval()  # adaptive parameters' Adam: 0.1 x lr = 5e-3
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    module.reset_adaptation()
    with torch.no_grad():
        before = module.network.adapted_logits(x, module.adaptive)
    random.seed(python_seed)
    torch.manual_seed(12)
    after = module.adapted_logits(x)
    expected, adaptive = TEST_STEP[python_seed], module.adaptive
    assert (adaptive[0].weight[0] - 1).sum().item() == pytest.approx(expected["dw1_0"], rel=0.02, abs=1e-6)
    assert (adaptive[2].weight[2] - 1).abs().sum().item() == pytest.approx(expected["dw3_2_abs"], rel=0.02)
    assert (adaptive[3].weight[4] - 1).abs().sum().item() == pytest.approx(expected["dw4_4_abs"], rel=0.02)
    assert adaptive[1].bias[0].abs().sum().item() == pytest.approx(expected["db2_0_abs"], rel=0.02)
    assert before[0].tolist() == pytest.approx(LOGITS_BEFORE_SEED0, abs=1e-5)
    if python_seed == 0:
        assert (after - before).flatten().tolist() == pytest.approx(LOGIT_CHANGE_SEED0, abs=2e-6)


# ------------------------------------------------------------------------------------------ mechanisms
def test_mixstyle_mixes_each_samples_channel_statistics_with_a_permuted_sample():
    h = torch.rand(6, 3, 5, 5) * 2 + torch.arange(6.0).view(6, 1, 1, 1)
    torch.manual_seed(3)
    out = mixstyle(h, alpha=0.1)
    torch.manual_seed(3)  # the same draws, in the same order: lambda, then the permutation
    lam = torch.distributions.Beta(0.1, 0.1).sample((6, 1, 1, 1))
    perm = torch.randperm(6)
    mu, sigma = h.mean((2, 3), keepdim=True), (h.var((2, 3), keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out.mean((2, 3), keepdim=True), lam * mu + (1 - lam) * mu[perm], atol=1e-5, rtol=0)
    torch.testing.assert_close((out.var((2, 3), keepdim=True) + 1e-6).sqrt(), lam * sigma + (1 - lam) * sigma[perm],
                               atol=1e-4, rtol=0)
    assert not torch.equal(perm, torch.arange(6))


def test_mixstyle_of_a_single_image_is_the_identity():
    """Why the evaluation batch matters: the official fork evaluates with batch 1, where z' = z and L_reg ~ 0."""
    h = torch.rand(1, 4, 5, 5)
    torch.testing.assert_close(mixstyle(h), h, atol=1e-5, rtol=0)


def test_fresh_adaptive_parameters_are_the_identity_on_feature_maps():
    module = small_module(image_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module.network.adapted_logits(x, module.adaptive), module.network(x))
    assert [tuple(s.weight[0].shape) for s in module.adaptive] == [(4, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2)]


def test_test_time_step_changes_only_the_adaptive_parameters():
    module = small_module(image_size=64, lr=1.0, test_loss_scale=1.0).eval()
    module.reset_adaptation()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.adapted_logits(torch.randn(8, 3, 64, 64))
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("adaptive.") for k in changed), changed
    assert all(p.grad is None for p in module.network.parameters())  # nothing accumulated into the network


def test_meta_penalty_is_second_order_and_trains_phi_only():
    """d penalty / d phi exists only through create_graph (d L_reg / d theta depends on phi). It matches a central
    finite difference (float64) of the penalty written out here, with the standardisation constants held at their
    values at phi (the official code takes them as Python numbers). The optimisers split the parameters: theta
    (backbone + classifier) and phi; the adaptive parameters are in neither."""
    module = small_module(image_size=64).double().train()
    x, y = torch.randn(6, 3, 64, 64, dtype=torch.float64), torch.arange(6) % 7
    backbone = [p for n, p in module.network.named_parameters() if not n.startswith("classifier.")]

    def seeded_losses():
        random.seed(0)
        torch.manual_seed(1)
        return module.losses(x, y)

    def flat_grad(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, backbone, retain_graph=True)])

    random.seed(0)
    torch.manual_seed(1)
    penalty = module.meta_penalty(x, y)
    weight = module.loss_network.weight[0]
    (grad,) = torch.autograd.grad(penalty, [weight])
    loss_cls, loss_reg = seeded_losses()
    reg0, cls0 = flat_grad(loss_reg).detach(), flat_grad(loss_cls).detach()
    target = (cls0 - cls0.mean()) / cls0.std()
    assert penalty.item() == pytest.approx(0.1 * ((reg0 - reg0.mean()) / reg0.std() - target).pow(2).mean().item())

    def frozen_constants_penalty() -> float:
        reg = flat_grad(seeded_losses()[1])
        return 0.1 * ((reg - reg0.mean()) / reg0.std() - target).pow(2).mean().item()

    eps, i, values = 1e-6, 3, []
    for shift in (eps, -2 * eps, eps):  # up, down, back
        with torch.no_grad():
            weight[i] += shift
        values.append(frozen_constants_penalty())
    assert grad[i].item() == pytest.approx((values[0] - values[1]) / (2 * eps), rel=1e-4)
    assert grad.abs().sum() > 0

    module.trainer = None
    optimisers = module.configure_optimizers()
    theta = {id(p) for g in optimisers[0]["optimizer"].param_groups for p in g["params"]}
    phi = {id(p) for g in optimisers[1]["optimizer"].param_groups for p in g["params"]}
    assert theta == {id(p) for p in module.network.parameters()}
    assert phi == {id(p) for p in module.loss_network.parameters()}
    assert optimisers[1]["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1 * module.lr)


def test_tent_adapts_only_a_copy_and_only_batchnorm_affine_parameters():
    module = small_module(ERM, tent_lr=0.1).eval()
    before = {k: v.clone() for k, v in module.network.state_dict().items()}
    module.reset_adaptation()
    x = torch.randn(16, 3, 64, 64)
    logits = module.adapted_logits(x)
    assert all(torch.equal(before[k], v) for k, v in module.network.state_dict().items())
    adapted = module.tent.network.state_dict()
    changed = {k for k in adapted if k in before and not torch.equal(before[k], adapted[k])}
    norm_affine = {f"{name}.{p}" for name, m in module.tent.network.named_modules()
                   if isinstance(m, torch.nn.BatchNorm2d) for p in ("weight", "bias")}
    assert changed and changed <= norm_affine
    with torch.no_grad():  # Tent's predictions are the loss's forward pass: batch statistics, weights before the step
        batch_stats = module.network.train()(x)
    torch.testing.assert_close(logits, batch_stats)


def test_prediction_entropy_matches_the_formula():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [30.0, -30.0, 0.0]])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    expected = -(p * np.log(np.clip(p, 1e-300, None))).sum(1)
    np.testing.assert_allclose(prediction_entropy(logits).numpy(), expected, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------- data
def test_batches_are_domain_balanced_and_the_held_out_domain_is_never_trained_on():
    dm = DomainGeneralizationDataModule(dataset="pacs_64px_subset", test_domain="sketch", batch_size=4, image_size=64,
                                        steps_per_epoch=5, eval_batch_size=64, num_workers=0)
    dm.setup("fit")
    domains = dm.domains[dm.train_idx]
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    for batch in batches:
        assert Counter(domains[batch["idx"].numpy()].tolist()) == {0: 4, 1: 4, 2: 4}  # 4 each of A, C, P; no S
    assert set(dm.domains[dm.test_idx].tolist()) == {3} and len(dm.test_idx) == 448
    assert not set(dm.train_idx) & set(dm.val_idx) and 3 not in set(dm.domains[dm.val_idx].tolist())
    assert len(dm.val_idx) == 3 * int(448 * 0.2)
    held_out, source_val = dm.val_dataloader()
    assert len(held_out.dataset) == 448 and len(source_val.dataset) == len(dm.val_idx)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="test_domain"):
        DomainGeneralizationDataModule(dataset="pacs_64px_subset", test_domain="photos")
    with pytest.raises(ValueError, match="dataset"):
        DomainGeneralizationDataModule(dataset="vlcs")
    module = small_module(image_size=64).eval()
    module.reset_adaptation()
    with pytest.raises(ValueError, match="image_size=64"):
        module.adapted_logits(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="depth"):
        AffineReLUStack((4,), 0)
