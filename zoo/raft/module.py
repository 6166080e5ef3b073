"""RAFT: Reward rAnked FineTuning for Generative Foundation Model Alignment (Dong et al., TMLR 2023).

Each round (one Lightning epoch, driven by :class:`~zoo.lm.rounds.RoundDataModule`): sample responses to fresh
prompts from the current model, score ``prompt + response`` with a frozen reward, keep the best, and fine-tune on
the kept samples with cross-entropy; repeat on-policy.

    local: K = int(1 / top_reward_percentage) samples per prompt, keep each prompt's best (ties -> first sample)
    top:   one sample per prompt, keep the int(N * top_reward_percentage) best of the batch

Follows OptimalScale/LMFlow ``pipeline/raft_aligner.py``: sampling with top_k 0 / top_p 1, a response length drawn
per prompt with ``randint(output_min_length, output_max_length)`` (upper bound exclusive), reward on the
prompt followed directly by the response, no reward normalisation, baseline or KL term, and one optimizer whose
state persists across rounds. Differences, said here on purpose: the loss masks the prompt tokens by default
(``mask_prompt``; LMFlow trains on prompt + response, set False for that), each sample ends with the EOS it
generated, HH-RLHF's text cleaning (``###Human`` cut, ``#`` filter) is not applied, and top-α selection is taken
per process (LMFlow gathers the kept samples of all processes after selecting per process too).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from zoo.core.module import ZooModule
from zoo.lm.generation import distinct_n, pack, sample, sequence_logprobs
from zoo.lm.tiny import CausalLM, masked_token_loss

from .rewards import Reward

__all__ = ["RAFT", "select_best"]


def select_best(rewards: torch.Tensor, strategy: str, top_reward_percentage: float) -> torch.Tensor:
    """Flat indices of the kept samples. ``rewards``: (prompts, K) for ``local``, (N,) or (N, 1) for ``top``."""
    if strategy == "local":
        best = rewards.argmax(dim=1)  # first maximum on ties, like numpy's argmax
        return torch.arange(len(rewards)) * rewards.shape[1] + best
    if strategy == "top":
        flat = rewards.flatten()
        keep = int(len(flat) * top_reward_percentage)
        return torch.argsort(flat, descending=True, stable=True)[:keep]
    raise ValueError(f"unknown selection {strategy!r}; use local or top")


class RAFT(ZooModule):
    """RAFT. Defaults: the paper's IMDB positive-sentiment setting as run by LMFlow's raft aligner.

    Args:
        network: the policy (:class:`CausalLM`), also the sampler.
        reward: a frozen :class:`~zoo.raft.rewards.Reward` (``list[str] -> tensor``).
        selection: ``local`` (best of K per prompt) or ``top`` (global top fraction).
        top_reward_percentage: alpha; ``local`` samples K = int(1 / alpha) responses per prompt.
        output_min_length, output_max_length: range of the per-round response length in tokens.
        temperature, top_p, top_k: sampling.
        mask_prompt: train on response tokens only (True) or on prompt + response (LMFlow).
        eval_max_new_tokens: length of the validation samples.
    """

    expected_metrics = ("val/reward", "val/distinct_2", "val/ppl")

    def __init__(self, network: CausalLM, reward: Reward, selection: Literal["local", "top"] = "top",
                 top_reward_percentage: float = 0.2, output_min_length: int = 16, output_max_length: int = 48,
                 temperature: float = 0.7, top_p: float = 1.0, top_k: int = 0, mask_prompt: bool = True,
                 eval_max_new_tokens: int = 48, seed: int = 0, optimizer: str = "adamw", lr: float = 2e-5,
                 weight_decay: float = 0.0, lr_schedule: str = "constant", **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         ema_decay=None, **base)
        self.reward = reward
        self.selection, self.top_reward_percentage = selection, top_reward_percentage
        self.output_min_length, self.output_max_length = output_min_length, output_max_length
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.mask_prompt, self.eval_max_new_tokens, self.seed = mask_prompt, eval_max_new_tokens, seed
        self.round_stats: dict[str, float] = {}
        self.history: list[dict] = []

    # ------------------------------------------------------------------ one round of data
    def build_round(self, prompts: list[dict], round_index: int) -> list[dict]:
        k = int(1 / self.top_reward_percentage) if self.selection == "local" else 1
        round_seed = self.seed * 1_000_003 + round_index * 1_009 + self.global_rank
        lengths = np.random.default_rng(round_seed).integers(self.output_min_length, self.output_max_length,
                                                             len(prompts)).tolist()
        texts = [p["prompt"] for p in prompts]
        samples = sample(self.network, texts, num_return_sequences=k, max_new_tokens=max(lengths),
                         temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=round_seed)
        # a prompt's length limit cuts its samples: the first L sampled tokens are a sample of max_new_tokens=L
        responses = [[r[:length] for r in group] for group, length in zip(samples.response_ids, lengths)]
        decoded = [self.network.tokenizer.batch_decode(group, skip_special_tokens=True) for group in responses]
        rewards = self.reward([t + r for t, group in zip(texts, decoded) for r in group]).view(len(texts), k)
        kept = select_best(rewards, self.selection, self.top_reward_percentage)
        examples = [{"prompt": samples.prompt_ids[i // k], "response": responses[i // k][i % k],
                     "text": decoded[i // k][i % k], "reward": rewards[i // k, i % k].item()} for i in kept.tolist()]
        self.round_stats = {"round/sample_reward": rewards.mean().item(),
                            "round/kept_reward": rewards.flatten()[kept].mean().item(),
                            "round/kept_samples": float(len(examples))}
        return examples

    def collate(self, examples: list[dict]) -> dict:
        return pack([e["prompt"] for e in examples], [e["response"] for e in examples], self.network.pad_id)

    # ------------------------------------------------------------------ SFT on the kept samples
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.network(batch["input_ids"], batch["attention_mask"])
        targets = batch["response_mask"] if self.mask_prompt else batch["attention_mask"]
        loss = masked_token_loss(logits, batch["input_ids"], targets)
        self.log("train/loss", loss, prog_bar=True)
        if batch_idx == 0:
            self.log_dict(self.round_stats)
        return loss

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        self._val = {"rewards": [], "responses": [], "nll": 0.0, "tokens": 0}

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        prompts = [item["prompt"] for item in batch]
        samples = sample(self.network, prompts, max_new_tokens=self.eval_max_new_tokens,
                         temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                         seed=self.seed * 1_000_003 + batch_idx)  # the same draws every evaluation
        responses = [group[0] for group in samples.responses]
        self._val["rewards"].append(self.reward([p + r for p, r in zip(prompts, responses)]))
        self._val["responses"] += responses
        # perplexity of the real continuation of each held-out prompt
        targets = [self.network.tokenizer(item["target"], add_special_tokens=False).input_ids for item in batch]
        packed = {k: v.to(self.device) for k, v in pack(samples.prompt_ids, targets, self.network.pad_id).items()}
        self._val["nll"] -= sequence_logprobs(self.network, **packed).sum().item()
        self._val["tokens"] += sum(len(t) for t in targets)

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/reward": torch.cat(self._val["rewards"]).mean().item(),
                   "val/distinct_1": distinct_n(self._val["responses"], 1),
                   "val/distinct_2": distinct_n(self._val["responses"], 2),
                   "val/ppl": float(np.exp(self._val["nll"] / max(1, self._val["tokens"])))}
        self.log_dict(metrics, sync_dist=True)
        label = ("base" if self.trainer.sanity_checking else f"after round {self.current_epoch + 1}"
                 if self.trainer.state.fn == "fit" else "final")
        self.history.append({"round": label, **metrics, **self.round_stats})
        if self.trainer.is_global_zero:
            print(f"[raft] {label}: " + "  ".join(f"{k}={v:.4f}" for k, v in {**metrics, **self.round_stats}.items()),
                  flush=True)
            print(f"[raft]   sample: {self._val['responses'][0]!r}", flush=True)
