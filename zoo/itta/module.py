"""ITTA: Improved Test-Time Adaptation for domain generalisation (Chen et al., CVPR 2023; official code
``liangchen527/ITTA``, ``domainbed/algorithms.py`` class ``ITTA``).

A backbone f_theta gives original features z and, through a MixStyle-perturbed path, augmented features z'.
A learnable consistency loss replaces a hand-made one: g_phi is a stack of element-wise affine maps and ReLUs,

    L_reg = mean( g_phi(z' - z)^2 ),        L_theta = CE(z) + CE(z') + L_reg          (network step on theta)

and phi is trained so that L_reg pulls theta the way the classification loss does: with g = d/dtheta
flattened over all backbone parameters and n(v) = (v - mean v) / std v (constants detached),

    P(phi) = 0.1 * mean( (n(d L_reg / d theta) - sg n(d L_cls / d theta))^2 )           (meta step on phi only)

which needs second-order gradients (d L_reg / d theta depends on phi; ``create_graph=True``). At test time,
adaptive parameters (per-position affine stacks after each residual stage, identity at the start) take one Adam
step per test batch on ``1e-6 * L_reg`` (everything else fixed), then predict the batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DomainGeneralizationModule
from .networks import AffineReLUStack, StagedResNet

__all__ = ["ITTA", "gradient_alignment_penalty"]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    # losses in float32 under bf16 / fp16 autocast (float64 stays float64)
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _standardise(v: torch.Tensor) -> torch.Tensor:
    # the official ``l2_between_dicts(normalize=True)`` takes mean and std as Python numbers: no gradient through them
    return (v - v.mean().detach()) / v.std().detach()


def gradient_alignment_penalty(loss_reg: torch.Tensor, loss_cls: torch.Tensor, params: list[nn.Parameter],
                               weight: float = 0.1) -> torch.Tensor:
    """``weight`` x the mean squared distance between the standardised gradients of ``loss_reg`` (kept in the graph,
    so the penalty is differentiable in whatever ``loss_reg`` depends on) and of ``loss_cls`` (a constant target)
    with respect to ``params``."""
    grads_reg = torch.autograd.grad(loss_reg, params, create_graph=True)
    grads_cls = torch.autograd.grad(loss_cls, params, retain_graph=True)
    flat_reg = torch.cat([g.reshape(-1) for g in grads_reg])
    flat_cls = torch.cat([g.reshape(-1) for g in grads_cls])
    return weight * (_standardise(flat_reg) - _standardise(flat_cls).detach()).pow(2).mean()


class ITTA(DomainGeneralizationModule):
    """ITTA on a :class:`~zoo.itta.networks.StagedResNet`.

    Args:
        network: the backbone with its classifier.
        image_size: input height = width; fixes the shapes of the per-position adaptive parameters.
        loss_depth: affine layers of g_phi (official ``Adaparams(depth=10)``).
        adaptive_depth: affine layers per stage of the adaptive parameters (official ``MappingNetwork(depth=5)``).
        mixstyle_alpha: MixStyle's Beta(alpha, alpha) mixing weight (official 0.1).
        penalty_weight: weight of the gradient-alignment penalty of the meta step (official 0.1).
        phi_lr_scale: g_phi's Adam learning rate is ``phi_lr_scale * lr`` (official 0.1).
        test_lr_scale: the adaptive parameters' Adam learning rate is ``test_lr_scale * lr`` (official 0.1).
        test_loss_scale: the test-time loss is ``test_loss_scale * L_reg`` (official ``ada_lr``: 1e-6; 0.1 on
            DomainNet).
        Other arguments: :class:`~zoo.itta.base.DomainGeneralizationModule` / :class:`~zoo.core.module.ZooModule`.
    """

    def __init__(self, network: StagedResNet, image_size: int = 224, loss_depth: int = 10, adaptive_depth: int = 5,
                 mixstyle_alpha: float = 0.1, penalty_weight: float = 0.1, phi_lr_scale: float = 0.1,
                 test_lr_scale: float = 0.1, test_loss_scale: float = 1e-6, **base):
        super().__init__(network, **base)
        self.image_size, self.mixstyle_alpha, self.penalty_weight = image_size, mixstyle_alpha, penalty_weight
        self.phi_lr_scale, self.test_lr_scale, self.test_loss_scale = phi_lr_scale, test_lr_scale, test_loss_scale
        self.loss_network = AffineReLUStack((network.num_features,), loss_depth)  # g_phi
        self.adaptive = nn.ModuleList([AffineReLUStack(shape, adaptive_depth)
                                       for shape in network.stage_shapes(image_size)])
        self.adaptive.requires_grad_(False)  # trained only inside the test-time step
        self.test_optimizer: torch.optim.Optimizer | None = None
        self.automatic_optimization = False  # two updates per batch: theta, then phi

    def configure_optimizers(self):
        network = super().configure_optimizers()  # Adam on the backbone and classifier
        network = network if isinstance(network, dict) else {"optimizer": network}
        phi = torch.optim.Adam(self.loss_network.parameters(), lr=self.phi_lr_scale * self.lr)
        return [network, {"optimizer": phi}]

    # ---------------------------------------------------------------------------- training
    def consistency_loss(self, z: torch.Tensor, z_aug: torch.Tensor) -> torch.Tensor:
        """L_reg = mean(g_phi(z' - z)^2) (official ``MSELoss(adaparams(z_aug - z_ori), 0)``), float32."""
        return self.loss_network(_upcast(z_aug - z)).pow(2).mean()

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE(z) + CE(z'), L_reg) on one forward pass of both paths."""
        z, z_aug = self.network.two_paths(x, self.mixstyle_alpha)
        loss_cls = (F.cross_entropy(_upcast(self.network.classifier(z)), y)
                    + F.cross_entropy(_upcast(self.network.classifier(z_aug)), y))
        return loss_cls, self.consistency_loss(z, z_aug)

    def meta_penalty(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The gradient-alignment penalty on a fresh forward pass, differentiable in phi."""
        loss_cls, loss_reg = self.losses(x, y)
        backbone = [p for name, p in self.network.named_parameters() if not name.startswith("classifier.")]
        return gradient_alignment_penalty(loss_reg, loss_cls, backbone, self.penalty_weight)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        network_opt, phi_opt = self.optimizers()
        loss_cls, loss_reg = self.losses(x, y)
        network_opt.zero_grad()
        self.manual_backward(loss_cls + loss_reg)  # phi's gradient from this loss is dropped before phi's step
        network_opt.step()
        schedule = self.lr_schedulers()
        if schedule is not None:
            schedule.step()

        penalty = self.meta_penalty(x, y)  # on the updated network, as the official update
        phi_opt.zero_grad()
        self.manual_backward(penalty, inputs=list(self.loss_network.parameters()))
        # phi's step is part of this training step: the raw optimiser, so trainer.global_step counts batches
        phi_opt.optimizer.step()
        self.log_dict({"train/loss_cls": loss_cls.detach(), "train/loss_reg": loss_reg.detach(),
                       "train/penalty": penalty.detach()}, prog_bar=True)
        return (loss_cls + loss_reg).detach()

    # -------------------------------------------------------------------- test time
    def reset_adaptation(self) -> None:
        for stack in self.adaptive:
            stack.reset_to_identity()
        self.test_optimizer = torch.optim.Adam(self.adaptive.parameters(), lr=self.test_lr_scale * self.lr)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """One Adam step of the adaptive parameters on ``test_loss_scale * L_reg`` of batch ``x`` (``test_adapt``)."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"test images are {tuple(x.shape[-2:])}, the adaptive parameters were built for "
                             f"image_size={self.image_size}")
        self.adaptive.requires_grad_(True)
        z, z_aug = self.network.two_paths(x, self.mixstyle_alpha, self.adaptive)
        loss = self.test_loss_scale * self.consistency_loss(z, z_aug)
        self.test_optimizer.zero_grad()
        loss.backward(inputs=list(self.adaptive.parameters()))
        self.test_optimizer.step()
        self.adaptive.requires_grad_(False)
        return loss.detach()

    def adapted_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.adapt(x)
        with torch.no_grad():
            return _upcast(self.network.adapted_logits(x, self.adaptive))
