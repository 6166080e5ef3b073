"""The Trickle-down Impact of Reward (In-)consistency on RLHF (Shen, Chen et al., ICLR 2024): Contrast Instructions.

A reward model R (a scalar head on the last non-pad token) is trained with the Bradley-Terry loss
-log sigmoid(R(x, y+) - R(x, y-)). Besides pairwise accuracy, it is judged on Contrast Instructions: pairs of
lexically similar instructions q, p with different gold answers y_q, y_p.

    instruction consistency = mean 1[ R(q, y_q) > R(p, y_q) ]      (the right instruction wins for a fixed answer)
    response consistency    = mean 1[ R(q, y_q) > R(q, y_p) ]      (the right answer wins for a fixed instruction)

Two fixes: ConvexDA (training data, see :mod:`zoo.reward_consistency.augment` and ``data.convex_augment``) and
RewardFusion (inference): R_fused(s) = sum_i w_i R(t_i) over s itself (similarity 1) and its retrieved training
neighbours (similarity >= 0.9, top 5), w_i = sim_i / sum_j sim_j; both plain and fused metrics are logged.

Follows shadowkiller33/Contrast-Instruction (``code/reward_modeling.py``, ``reward_para.py``, ``reward_fusion.py``,
``DA_convex.py``): strict ``>`` for consistency (the fusion script's ``>=`` is not used), identical response pairs
skipped; the loss and defaults (lr 2e-5, weight decay 0.001, 1 epoch, LoRA r 8 alpha 32 on LLaMA-7B). Deliberate
differences: the fusion dedups neighbours on both sides (the code skips duplicates for the preferred side only), one
evaluation table scores every text once instead of batch size 1, MiniLM replaces SimCSE-RoBERTa as the embedder, and
ConvexDA keeps one distinct record per hull vertex (the code appends the same mutated dict once per vertex).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from zoo.core.module import ZooModule
from zoo.lm.heads import bradley_terry_loss

__all__ = ["RewardModel", "fuse_rewards", "consistency"]


def fuse_rewards(rewards: torch.Tensor, quantity_rows: torch.Tensor, text_rows: torch.Tensor,
                 weights: torch.Tensor, num_quantities: int) -> torch.Tensor:
    """``out[q] = sum over entries e with quantity_rows[e] == q of weights[e] * rewards[text_rows[e]]``."""
    out = torch.zeros(num_quantities, dtype=rewards.dtype, device=rewards.device)
    contributions = weights.to(rewards) * rewards[text_rows.to(rewards.device)]
    return out.index_add_(0, quantity_rows.to(rewards.device), contributions)


def consistency(scores: torch.Tensor, pairs: torch.Tensor) -> tuple[float, int]:
    """Fraction of ``pairs`` rows (a, b) with ``scores[a] > scores[b]``, over the rows whose scores are both finite."""
    a, b = scores[pairs[:, 0]], scores[pairs[:, 1]]
    known = torch.isfinite(a) & torch.isfinite(b)
    count = int(known.sum())
    return (float((a[known] > b[known]).float().mean()) if count else math.nan), count


class RewardModel(ZooModule):
    """Bradley-Terry reward model with the Contrast-Instructions evaluation.

    Args:
        network: a :class:`zoo.lm.heads.SequenceHead` with 1 output.
        The optimisation arguments are the base's; defaults are the paper's (AdamW lr 2e-5, weight decay 0.001).
    """

    expected_metrics = ("train/loss", "val/rm_acc", "val/instruction_consistency", "val/response_consistency")

    def __init__(self, network: nn.Module, optimizer: str = "adamw", lr: float = 2e-5, weight_decay: float = 0.001,
                 cosine_cycles: float = 0.5, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, cosine_cycles=cosine_cycles,
                         ema_decay=None, **base)

    @property
    def zero_grad_parameters(self) -> tuple[str, ...]:
        """The pairwise loss sees reward differences only, so the backbone's final LayerNorm bias, which shifts
        every reward by the same amount, gets a gradient of exactly zero (up to rounding)."""
        norms = [name for name, module in self.network.named_modules() if isinstance(module, nn.LayerNorm)]
        return tuple(f"network.{name}.bias" for name in norms[-1:])

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.network(input_ids, attention_mask).squeeze(-1).float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        rewards = self.reward(batch["input_ids"], batch["attention_mask"])  # one forward: chosen rows, then rejected
        chosen, rejected = rewards.chunk(2)
        loss = bradley_terry_loss(chosen, rejected)
        self.log_dict({"train/loss": loss, "train/acc": (chosen > rejected).float().mean()})
        return loss

    def on_validation_epoch_start(self) -> None:
        self._text_rewards = torch.full((len(self.trainer.datamodule.eval_set),), math.nan, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._text_rewards[batch["idx"]] = self.reward(batch["input_ids"], batch["attention_mask"])

    def on_validation_epoch_end(self) -> None:
        dm = self.trainer.datamodule
        variants = ["plain"] + ["fused"] * ("fused" in dm.plan)
        for variant in variants:
            scores = fuse_rewards(self._text_rewards, *dm.plan[variant], dm.num_quantities)  # NaN if a text is unscored
            prefix = "val/" if variant == "plain" else "val/fused_"
            for name, key in (("rm", "rm_acc"), ("instruction", "instruction_consistency"),
                              ("response", "response_consistency")):
                value, count = consistency(scores, dm.plan[name])
                if count:
                    self.log(prefix + key, value)
        if "fused" in dm.plan:  # share of scored texts that found at least one neighbour to fuse with
            self.log("val/fusion_hit_rate", dm.fusion_hit_rate)
