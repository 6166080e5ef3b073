"""T-JEPA: "T-JEPA: Augmentation-Free Self-Supervised Learning for Tabular Data" (Thimonier, De Melo Costa,
Popineau, Rimmel, Doan; ICLR 2025), following the official code github.com/jose-melo/t-jepa (commit 98dda99):
``src/encoder.py`` (tokenizer, encoder), ``src/predictors.py`` (transformer predictor), ``src/mask.py``
(``MaskCollator``), ``src/train.py`` (the step), ``run.py`` + ``scripts/launch_tjepa.sh`` (defaults: Jannis).

One step, per row:
1. Tokens: each numerical feature j is ``w_j x_j + b_j``; ``num_reg_tokens`` learned regularization tokens
   ([REG], the official ``n_cls_tokens``) come first; a fixed sinusoidal position code is added to every token.
2. Masks (:func:`sample_mask_sizes`, :func:`sample_row_masks`): the batch shares a context size and a target
   size; each row draws one context subset and ``num_targets`` target subsets from the rest (disjoint from it).
   As the official code, the indices run over ``range(num_features)`` of the token sequence, whose first
   ``num_reg_tokens`` positions are the [REG] tokens: a [REG] token is masked like a feature.
3. The context encoder sees only the context tokens; the target encoder (an EMA of it) sees the whole row, and its
   outputs at the target positions are the targets (no gradient).
4. The predictor maps the context to predictions at the target positions; loss = MSE (float32).
5. After the optimizer step the target encoder moves by ``t <- m t + (1 - m) context``, m linear 0.996 -> 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.core.module import ZooModule
from zoo.core.teacher import EMATeacher

__all__ = ["TJEPA", "TabularEncoder", "TokenPredictor", "gather_tokens", "sample_mask_sizes", "sample_row_masks"]


# ----------------------------------------------------------------------------------------------------- masking
def sample_mask_sizes(num_features: int, context_share: tuple[float, float], target_share: tuple[float, float],
                      generator: torch.Generator) -> tuple[int, int]:
    """(context size, target size) of one batch, as ``MaskCollator.__call__``: bounds ``round(D * share)``, each
    size ``min + round((max - min) * u)`` with u ~ U[0, 1) in float32, redrawn until context + target <= D."""
    low_c, high_c = (round(num_features * s) for s in context_share)
    low_t, high_t = (round(num_features * s) for s in target_share)
    if not 0 < low_c < high_c or low_t <= 0:
        raise ValueError(f"mask shares {context_share}, {target_share} give empty or equal bounds for "
                         f"{num_features} features")
    while True:
        context = low_c + int(torch.round((high_c - low_c) * torch.rand(1, generator=generator)))
        target = low_t + int(torch.round((high_t - low_t) * torch.rand(1, generator=generator)))
        if context + target <= num_features:
            return context, target


def sample_row_masks(num_features: int, context_size: int, target_size: int, num_targets: int,
                     rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """One row's context indices ``(context_size,)`` and target indices ``(num_targets, target_size)``: the
    official ``MaskCollator.create_masks`` draws (shuffle, take the context, shuffle the sorted rest once per
    target). The official code stores each target as a *view* of the array it shuffles again, so all its targets
    end up equal to the last one; here each target keeps its own draw, the paper's M distinct targets."""
    indices = np.arange(num_features)
    rng.shuffle(indices)
    context = indices[:context_size].copy()
    rest = np.setdiff1d(indices, context)
    targets = []
    for _ in range(num_targets):
        rng.shuffle(rest)
        targets.append(rest[:target_size].copy())
    return context, np.stack(targets)


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tokens`` (B, N, H) at ``indices`` (B, K) -> (B, K, H)."""
    return torch.gather(tokens, 1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def sincos_table(num_positions: int, dim: int, base: float) -> torch.Tensor:
    """(num_positions, dim): sin on even, cos on odd channels, frequencies ``base ** (-2i / dim)`` (the encoder's
    ``PositionalEncoding``, base 100)."""
    position = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(base) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    return table


def sincos_halves(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim): [sin | cos] halves, frequencies ``10000 ** (-2i / dim)`` (the predictor's
    ``get_1d_sincos_pos_embed``, from I-JEPA)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.outer(np.arange(num_positions), omega)
    return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1)).float()


# ----------------------------------------------------------------------------------------------------- networks
class Transformer(nn.Module):
    """The official ``TabularEncoder``: post-norm transformer layers, then dropout, LayerNorm, Linear, dropout,
    LayerNorm."""

    def __init__(self, dim: int, num_layers: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward, dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.fc = nn.Linear(dim, dim)
        self.layernorm1, self.layernorm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layernorm1(self.dropout(self.transformer(x)))
        return self.layernorm2(self.dropout(self.fc(x)))


def _trunc_normal_init(module: nn.Module) -> None:
    """The official ``init_weights(init_type="trunc_normal")``: Linear N(0, 0.02) truncated at +-2, zero bias;
    LayerNorm (1, 0). MultiheadAttention's packed input projection keeps torch's init, as there."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TabularEncoder(nn.Module):
    """Feature tokenizer + [REG] tokens + position code + :class:`Transformer` (the official ``Encoder`` for
    numerical features). ``forward(x, keep)`` encodes only the tokens at ``keep`` (B, K); all of them without."""

    def __init__(self, num_features: int, num_reg_tokens: int, dim: int, num_layers: int, num_heads: int,
                 dim_feedforward: int, dropout: float):
        super().__init__()
        self.num_reg_tokens = num_reg_tokens
        # tokenizer: row r of `weight` scales value r of [1]*num_reg + x; [REG] tokens have no bias
        self.tokenizer = nn.Module()
        self.tokenizer.weight = nn.Parameter(torch.empty(num_reg_tokens + num_features, dim))
        self.tokenizer.bias = nn.Parameter(torch.empty(num_features, dim))
        self.encoder = Transformer(dim, num_layers, num_heads, dim_feedforward, dropout)
        self.register_buffer("position", sincos_table(num_reg_tokens + num_features, dim, base=100.0),
                             persistent=False)
        for p in (self.tokenizer.weight, self.tokenizer.bias):  # nn.Linear's init, as the official Tokenizer
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        _trunc_normal_init(self.encoder)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        values = torch.cat([x.new_ones(len(x), self.num_reg_tokens), x], dim=1)
        bias = F.pad(self.tokenizer.bias, (0, 0, self.num_reg_tokens, 0))
        return self.tokenizer.weight * values.unsqueeze(-1) + bias + self.position

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.tokens(x)
        return self.encoder(tokens if keep is None else gather_tokens(tokens, keep))


class TokenPredictor(nn.Module):
    """The official ``TransformerPredictor``: context representations -> ``pred_dim``, plus fixed position codes
    of their indices; one learned mask token + position code per target index; a :class:`Transformer` over
    [context, mask tokens]; its outputs at the mask tokens projected back to the encoder width."""

    def __init__(self, num_positions: int, dim: int, pred_dim: int, num_layers: int, num_heads: int,
                 dim_feedforward: int, dropout: float):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.predictor_emb = nn.Linear(dim, pred_dim)
        self.transformer = Transformer(pred_dim, num_layers, num_heads, dim_feedforward, dropout)
        self.predictor_norm = nn.LayerNorm(pred_dim)
        self.predictor_proj = nn.Linear(pred_dim, dim)
        self.register_buffer("position", sincos_halves(num_positions, pred_dim).unsqueeze(0), persistent=False)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-2.0, b=2.0)
        _trunc_normal_init(self)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """``context`` (B, K, H) at ``context_idx`` (B, K); ``target_idx`` (M, B, T) -> predictions (M*B, T, H),
        target-major as the official ``torch.cat`` over masks."""
        num_targets, batch, _ = target_idx.shape
        position = self.position.expand(batch, -1, -1)
        context = self.predictor_emb(context) + gather_tokens(position, context_idx)
        queries = torch.cat([self.mask_token + gather_tokens(position, t) for t in target_idx])
        x = torch.cat([context.repeat(num_targets, 1, 1), queries], dim=1)
        x = self.predictor_norm(self.transformer(x))
        return self.predictor_proj(x[:, context.shape[1]:])


# ----------------------------------------------------------------------------------------------------- the method
class TJEPA(ZooModule):
    """T-JEPA pre-training. ``self.network`` is the context encoder, ``self.target_encoder`` its EMA
    (:class:`~zoo.core.teacher.EMATeacher`), ``representations(x)`` the target encoder's tokens, flattened (what
    the official ``OnlineDataset`` hands the downstream models, ``encoder_type="linear_flatten"``).

    Defaults are ``scripts/launch_tjepa.sh`` (Jannis) and ``src/configs.py`` where the script is silent.

    Args:
        num_features: D, numerical features per row.
        num_reg_tokens: [REG] tokens (``--n_cls_tokens=1``).
        dim, num_layers, num_heads, dim_feedforward, dropout: encoder (64, 16, 2, 64, 0.00185).
        pred_dim, pred_num_layers, pred_num_heads, pred_dim_feedforward, pred_dropout: predictor (16, 16, 4,
            256 from configs.py, 0.00193).
        context_share, target_share: (min, max) shares of D (0.136-0.368, 0.156-0.622).
        num_targets: target subsets per row (``--mask_num_preds=4``).
        ema_start, ema_end: target momentum, linear over the run (0.996 -> 1).
        grad_clip_value: the context encoder's gradients clamped element-wise (``--exp_gradient_clipping=1.0``,
            a hook on its parameters; the predictor is not clipped).
        mask_seed: seed of the per-batch mask sizes (the official collator seeds them with its step counter).
        lr, warmup_steps: AdamW 3.66e-4, no weight decay, linear warm-up (10 epochs) then cosine to 0.
    """

    def __init__(self, num_features: int = 54, num_reg_tokens: int = 1, dim: int = 64, num_layers: int = 16,
                 num_heads: int = 2, dim_feedforward: int = 64, dropout: float = 0.0018542257314766695,
                 pred_dim: int = 16, pred_num_layers: int = 16, pred_num_heads: int = 4,
                 pred_dim_feedforward: int = 256, pred_dropout: float = 0.0019307456645321797,
                 context_share: tuple[float, float] = (0.13628349247854785, 0.36819012681604135),
                 target_share: tuple[float, float] = (0.1556321308543076, 0.6222278244105446), num_targets: int = 4,
                 ema_start: float = 0.996, ema_end: float = 1.0, grad_clip_value: float | None = 1.0,
                 mask_seed: int = 0, optimizer: str = "adamw", lr: float = 0.0003658682841082736,
                 weight_decay: float = 0.0, warmup_steps: int = 1050, cosine_cycles: float = 0.5, **base):
        encoder = TabularEncoder(num_features, num_reg_tokens, dim, num_layers, num_heads, dim_feedforward, dropout)
        super().__init__(encoder, optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         cosine_cycles=cosine_cycles, ema_decay=None, **base)
        self.num_features, self.num_targets = num_features, num_targets
        self.context_share, self.target_share = tuple(context_share), tuple(target_share)
        self.ema_start, self.ema_end, self.grad_clip_value = ema_start, ema_end, grad_clip_value
        self.mask_seed = mask_seed
        self.predictor = TokenPredictor(num_features, dim, pred_dim, pred_num_layers, pred_num_heads,
                                        pred_dim_feedforward, pred_dropout)
        # the official target encoder is never put in eval mode: it runs dropout in training, without gradient
        self.target_encoder = EMATeacher(encoder, train_mode=True)
        self.total_steps: int | None = None
        self.expected_metrics = ("train/loss", "val/loss")

    # ------------------------------------------------------------------ masks
    def sample_masks(self, seeds: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (B, C) and target (M, B, T) indices: sizes from (mask_seed, step), the same on every process;
        each row's subsets from its own draw seed, so a row's masks do not depend on the number of processes."""
        sizes = torch.Generator().manual_seed(self.mask_seed * 1_000_003 + step)
        context_size, target_size = sample_mask_sizes(self.num_features, self.context_share, self.target_share,
                                                      sizes)
        rows = [sample_row_masks(self.num_features, context_size, target_size, self.num_targets,
                                 np.random.RandomState(int(s) % 2**32)) for s in seeds.tolist()]
        context = torch.from_numpy(np.stack([c for c, _ in rows]))
        targets = torch.from_numpy(np.stack([t for _, t in rows], axis=1))
        return context.to(self.device), targets.to(self.device)

    # ------------------------------------------------------------------ the step
    def jepa_loss(self, x: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            full = self.target_encoder(x)
            targets = torch.cat([gather_tokens(full, t) for t in target_idx])  # (M*B, T, H), target-major
        context = self.network(x, context_idx)
        predictions = self.predictor(context, context_idx, target_idx)
        return F.mse_loss(predictions.float(), targets.float())  # float32 under bf16 autocast

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        context_idx, target_idx = self.sample_masks(batch["seed"], self.global_step)
        loss = self.jepa_loss(batch["x"], context_idx, target_idx)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/target_momentum", self.target_momentum_at(self.global_step))
        self.log("train/context_size", float(context_idx.shape[1]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # the JEPA loss on the val rows, masks from a fixed step so that every validation sees the same ones
        context_idx, target_idx = self.sample_masks(batch["idx"], step=-1 - batch_idx)
        self.log("val/loss", self.jepa_loss(batch["x"], context_idx, target_idx), sync_dist=True)

    @torch.no_grad()
    def representations(self, x: torch.Tensor) -> torch.Tensor:
        """The target encoder's tokens of whole rows, flattened: (B, (num_reg_tokens + D) * dim)."""
        return self.target_encoder.module(x).flatten(1)

    # ------------------------------------------------------------------ optimisation and the target
    def on_fit_start(self) -> None:
        self.total_steps = int(self.trainer.estimated_stepping_batches)

    def target_momentum_at(self, step: int) -> float:
        """The official ``momentum_scheduler``: ``start + step (end - start) / total_steps`` at update ``step``."""
        if self.total_steps is None:
            raise RuntimeError("TJEPA.total_steps is set in on_fit_start; set it by hand to step outside a Trainer")
        return self.ema_start + step * (self.ema_end - self.ema_start) / self.total_steps

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.grad_clip_value is not None:
            nn.utils.clip_grad_value_(self.network.parameters(), self.grad_clip_value)

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.target_encoder.update(self.network, self.target_momentum_at(self.global_step))
