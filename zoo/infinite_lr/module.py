"""Continual MAE pre-training under the infinite learning-rate schedule (Singh, Janson et al., CoLLAs 2025, "Beyond
Cosine Decay"), against repeated cosine decay.

A masked autoencoder (He et al., 2022) is pre-trained on a stream of tasks (disjoint class sets) without labels:

    keep a random 25 % of the patch tokens (mask ratio 0.75), encode them with a ViT, decode all tokens (mask tokens
    at the hidden positions), and minimise over the hidden patches (m_p = 1), P = pixels x channels per patch,

        L = sum_p m_p ||x̂_p - (x_p - mean(x_p)) / sqrt(var(x_p) + 1e-6)||² / (P sum_p m_p)    (normalised pixels).

The schedule is the whole method. Infinite ("inf-cos", Ibrahim et al., 2024): eta = eta_max (n+1)/N_w for n < N_w,
a cosine cool-down eta_const + (eta_max - eta_const)(1 + cos(pi (n - N_w)/N_cd))/2 over N_cd steps, then eta_const
for ever, across task boundaries; to evaluate at a task's end, a *copy* is annealed eta_const -> eta_min
(exponentially) on the current task and probed, training continuing from the constant phase. Repeated cosine (the
baseline): re-warm to eta_max at every task boundary and decay to eta_min within the task. Both are base schedules
(``lr_schedule`` of :class:`~zoo.core.module.ZooModule`); the task matrix and anneal-on-a-copy are the continual
family's :class:`~zoo.continual.evaluation.TaskMatrix`.
"""
from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from zoo.core.module import ZooModule

__all__ = ["InfiniteLRMAE", "MaskedAutoencoder", "masked_patch_loss", "patchify", "random_masking", "sincos_2d"]


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (grid*grid, dim): half the channels encode the row, half the
    column, each as sin/cos at frequencies 1/10000^(k/(dim/4)) (MAE's ``get_2d_sincos_pos_embed``)."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = [f(axis.reshape(-1, 1) * omega) for axis in (cols, rows) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, patch*patch*C), patches in row-major order, pixels (row, col, channel) inside."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def random_masking(tokens: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep ``int(L * (1 - mask_ratio))`` tokens per sample, chosen uniformly by sorting uniform noise. Returns the
    kept tokens, the binary mask (N, L; 1 = hidden, the loss's positions) and the permutation restoring order."""
    n, length, dim = tokens.shape
    keep = int(length * (1 - mask_ratio))
    shuffle = torch.rand(n, length, device=tokens.device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    kept = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = torch.ones(n, length, device=tokens.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


def masked_patch_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error per patch, averaged over the hidden patches only; with ``norm_pix`` the target patch is
    standardised by its own mean and variance (unbiased=False, eps 1e-6 as in MAE). Computed in float32."""
    prediction, target = prediction.float(), target.float()
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=False)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (prediction - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder (cls token, fixed sin-cos positions) and a narrow transformer decoder.

    Defaults are a tiny CPU-sized model (32x32 images, patch 4, 4 encoder blocks of width 128); ViT-B/16 MAE is
    ``img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
    decoder_num_heads=16``.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 128,
                 depth: int = 4, num_heads: int = 4, decoder_embed_dim: int = 64, decoder_depth: int = 2,
                 decoder_num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.patch_size, grid = patch_size, img_size // patch_size
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, embed_dim), sincos_2d(embed_dim, grid)])[None],
                             persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", torch.cat([torch.zeros(1, decoder_embed_dim),
                                                             sincos_2d(decoder_embed_dim, grid)])[None],
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                  norm_layer=norm) for _ in range(decoder_depth))
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:  # MAE's: xavier-uniform linears (and patch embedding), N(0, 0.02) tokens
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, images: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        if mask_ratio > 0:
            tokens, mask, restore = random_masking(tokens, mask_ratio)
        else:  # every token, in order (deterministic features for probes)
            mask = tokens.new_zeros(tokens.shape[:2])
            restore = torch.arange(tokens.shape[1], device=tokens.device).expand(len(tokens), -1)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(tokens), -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, restore

    def decode(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        hidden = self.mask_token.expand(len(x), restore.shape[1] + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], hidden], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, x.shape[2]))  # back to image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch pixel predictions (N, L, p*p*C) and the mask (N, L; 1 = hidden)."""
        latent, mask, restore = self.encode(images, mask_ratio)
        return self.decode(latent, restore), mask

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen representation for probes: the mean of the unmasked encoder's patch tokens."""
        latent, _, _ = self.encode(images, mask_ratio=0.0)
        return latent[:, 1:].mean(dim=1)


class InfiniteLRMAE(ZooModule):
    """MAE pre-training on a task stream, the learning-rate schedule chosen by ``lr_schedule``: ``infinite`` (with
    ``warmup_steps``, ``cooldown_steps``, ``constant_lr_ratio``; evaluate with ``TaskMatrix(anneal_steps=K)``) or
    ``repeated_cosine`` (with ``lr_cycle_steps`` = the data's ``steps_per_task``, ``min_lr_ratio``).

    Args:
        network: a :class:`MaskedAutoencoder`.
        mask_ratio: hidden fraction of the patches (MAE: 0.75).
        norm_pix_loss: per-patch normalised pixel targets (MAE's ``--norm_pix_loss``).
        betas: AdamW's (MAE: (0.9, 0.95)).
        Base defaults changed: AdamW, weight decay 0.05 (MAE), the infinite schedule, no EMA.
    """

    expected_metrics = ("train/loss", "val/loss")

    def __init__(self, network: MaskedAutoencoder, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 betas: tuple[float, float] = (0.9, 0.95),
                 optimizer: Literal["sgd", "adamw", "radam", "adagrad"] = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.05,
                 lr_schedule: Literal["cosine", "step", "constant", "infinite", "repeated_cosine"] = "infinite",
                 ema_decay: float | None = None, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         ema_decay=ema_decay, **base)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.mask_ratio, self.norm_pix_loss, self.betas = mask_ratio, norm_pix_loss, tuple(betas)

    # the two functions the continual family's evaluation calls, on the training network or on its annealed copy
    def objective(self, network: MaskedAutoencoder, batch: dict) -> torch.Tensor:
        images = batch["image"]
        prediction, mask = network(images, self.mask_ratio)
        return masked_patch_loss(prediction, patchify(images, network.patch_size), mask, self.norm_pix_loss)

    def features(self, network: MaskedAutoencoder, images: torch.Tensor) -> torch.Tensor:
        return network.features(images)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.objective(self.network, batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/task", float(self.trainer.datamodule.task_of_step(self.global_step)))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self.objective(self.network, batch), on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        config = super().configure_optimizers()
        if self.optimizer_name in ("adamw", "radam"):
            optimizer = config["optimizer"] if isinstance(config, dict) else config
            for group in optimizer.param_groups:
                group["betas"] = self.betas
        return config
