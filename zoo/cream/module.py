"""CREAM: Consistency Regularized Self-Rewarding Language Models (Wang et al., ICLR 2025).

Self-rewarding loop, one round per Lightning epoch (:class:`~zoo.lm.rounds.RoundDataModule`), on fresh prompts:

1. the current model M_t samples N responses per prompt;
2. M_t scores them with its implicit DPO reward  r_t(y) = sum log pi_t(y|x) - sum log pi_0(y|x)  (pi_0: the
   initial model M0), and the previous model M_{t-1} with its length-normalised log-likelihood;
3. pair: chosen = argmax r_t, rejected = argmin r_t (prompt skipped when they coincide);
4. consistency C = (Kendall tau of the two ordinal rankings + 1) / 2, per prompt (``dyn``) or its mean over the
   round over all processes (``avg``, the README's command);
5. DPO with C as a soft label:  L = C * -log sig(beta Delta) + (1 - C) * -log sig(-beta Delta).
Plain self-rewarding (SRLM with the same implicit reward) is the same module with ``consistency="none"`` (C = 1).

Follows Raibows/CREAM (``rewarding.py``, ``cal_consistency.py``, ``sft_dpo_trainer.py``, ``config.py``): ranks by
``rankdata(method="ordinal")``, pairs from M_t's reward, rewards and log-probs summed over response tokens only
(prompt and padding masked), reference log-probs precomputed before training (here: at round start, from the policy
as the full-fine-tuning path does; with LoRA the official code disables the adapters instead), M_{t-1} = M0 in the
first round. Differences: consistency is keyed by prompt (the official ``zip`` can shift rates between prompts when
one is skipped, see reference-pitfalls §8); pairs whose two responses are the same tokens are skipped (their DPO
gradient is exactly zero); the schedule is one warm-up + cosine over all rounds instead of one per round; responses
end with the EOS the model generated, and that EOS is scored.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch

from zoo.core.module import ZooModule
from zoo.lm.generation import pack, sample, sequence_logprobs
from zoo.core.distributed import global_mean
from zoo.lm.preference import consistency_rate, dpo_loss
from zoo.lm.tiny import CausalLM

__all__ = ["CREAM", "preference_pairs"]


def preference_pairs(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected indices per prompt (argmax / argmin, first on ties) and which prompts keep a pair."""
    chosen, rejected = rewards.argmax(dim=1), rewards.argmin(dim=1)
    return chosen, rejected, chosen != rejected


class CREAM(ZooModule):
    """CREAM / SRLM. Defaults: the paper's Llama-3-8B setting (Raibows/CREAM ``config.py`` and README).

    Args:
        network: the policy M_t (after SFT: M1).
        reference: the initial model M0 (before SFT) for the implicit reward; it must differ from M1, or every
            first-round reward is zero and no pair forms.
        consistency: ``avg`` (one rate per round), ``dyn`` (per prompt), ``none`` (plain SRLM, C = 1) or a
            number (a fixed soft label, the control for CREAM's measured rate).
        beta: DPO temperature.
        num_samples, temperature, top_p, max_new_tokens: sampling of the candidate responses.
        eval_max_new_tokens: greedy decoding length for the accuracy evaluation.
    """

    def __init__(self, network: CausalLM, reference: CausalLM,
                 consistency: Literal["avg", "dyn", "none"] | float = "avg", beta: float = 0.1, num_samples: int = 5,
                 temperature: float = 0.8, top_p: float = 0.95, max_new_tokens: int = 768,
                 eval_max_new_tokens: int = 768, score_batch_size: int = 64, seed: int = 0, optimizer: str = "adamw",
                 lr: float = 1e-6, weight_decay: float = 0.01, cosine_cycles: float = 0.5, **base):
        super().__init__(network, optimizer=optimizer, lr=lr, weight_decay=weight_decay, cosine_cycles=cosine_cycles,
                         ema_decay=None, **base)
        self.reference = reference.requires_grad_(False).eval()
        self.previous = copy.deepcopy(self.reference)  # M_{t-1}; M0 in the first round
        if isinstance(consistency, str) and consistency not in ("avg", "dyn", "none"):
            raise ValueError(f"consistency must be avg, dyn, none or a number in [0, 1], got {consistency!r}")
        self.consistency, self.beta, self.num_samples = consistency, beta, num_samples
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.eval_max_new_tokens, self.score_batch_size, self.seed = eval_max_new_tokens, score_batch_size, seed
        self.round_stats: dict[str, float] = {}
        self.history: list[dict] = []

    def trainable_modules(self):
        return self.network

    # ------------------------------------------------------------------ one round of preference data
    @torch.no_grad()
    def _logprobs(self, lm: CausalLM, prompt_ids, response_ids, average: bool) -> torch.Tensor:
        """Scores without dropout, whatever mode the caller left ``lm`` in."""
        was_training, out = lm.training, []
        lm.eval()
        for s in range(0, len(prompt_ids), self.score_batch_size):
            batch = pack(prompt_ids[s: s + self.score_batch_size], response_ids[s: s + self.score_batch_size],
                         lm.pad_id)
            out.append(sequence_logprobs(lm, **{k: v.to(self.device) for k, v in batch.items()}, average=average))
        lm.train(was_training)
        return torch.cat(out).float().cpu()

    def build_round(self, prompts: list[dict], round_index: int) -> list[dict]:
        n = self.num_samples
        samples = sample(self.network, [p["prompt"] for p in prompts], num_return_sequences=n,
                         max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                         seed=self.seed * 1_000_003 + round_index * 1_009 + self.global_rank)
        prompt_ids = [p for p in samples.prompt_ids for _ in range(n)]
        response_ids = [r for group in samples.response_ids for r in group]
        policy = self._logprobs(self.network, prompt_ids, response_ids, average=False).view(-1, n)
        reward_current = policy - self._logprobs(self.reference, prompt_ids, response_ids, average=False).view(-1, n)
        reward_previous = self._logprobs(self.previous, prompt_ids, response_ids, average=True).view(-1, n)
        rates = consistency_rate(reward_current, reward_previous).float()
        if isinstance(self.consistency, str):
            labels = {"dyn": rates, "avg": global_mean(rates).expand_as(rates), "none": torch.ones_like(rates)}
            label = labels[self.consistency]
        else:  # a fixed soft label: the control showing what the *measured* consistency adds
            label = torch.full_like(rates, float(self.consistency))

        chosen, rejected, keep = preference_pairs(reward_current)
        examples, correct = [], {"sample": [], "chosen": [], "rejected": []}
        for i, item in enumerate(prompts):
            responses = samples.responses[i]
            verdicts = [self.trainer.datamodule.is_correct(r, item["target"]) for r in responses]  # diagnostics only
            correct["sample"] += verdicts
            c, r = chosen[i].item(), rejected[i].item()
            if not keep[i] or samples.response_ids[i][c] == samples.response_ids[i][r]:
                continue
            correct["chosen"].append(verdicts[c])
            correct["rejected"].append(verdicts[r])
            examples.append({"prompt": samples.prompt_ids[i], "chosen": samples.response_ids[i][c],
                             "rejected": samples.response_ids[i][r], "reference_chosen": policy[i, c].item(),
                             "reference_rejected": policy[i, r].item(), "consistency": label[i].item()})
        self.previous.load_state_dict(self.network.plain_state_dict())  # M_t becomes next round's M_{t-1}
        self.round_stats = {"round/consistency": global_mean(rates).item(), "round/pairs": float(len(examples)),
                            **{f"round/{k}_acc": sum(v) / max(1, len(v)) for k, v in correct.items()}}
        return examples

    def collate(self, examples: list[dict]) -> dict:
        prompts = [e["prompt"] for e in examples]
        batch = pack(prompts + prompts, [e["chosen"] for e in examples] + [e["rejected"] for e in examples],
                     self.network.pad_id)
        for key in ("reference_chosen", "reference_rejected", "consistency"):
            batch[key] = torch.tensor([e[key] for e in examples])
        return batch

    # ------------------------------------------------------------------ consistency-regularised DPO
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logps = sequence_logprobs(self.network, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        chosen, rejected = logps.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, batch["reference_chosen"], batch["reference_rejected"], self.beta, batch["consistency"])
        loss = losses.mean()
        self.log_dict({"train/loss": loss, "train/reward_acc": (chosen_rewards > rejected_rewards).float().mean(),
                       "train/chosen_reward": chosen_rewards.mean(), "train/rejected_reward": rejected_rewards.mean(),
                       "train/consistency": batch["consistency"].mean()}, prog_bar=False)
        if batch_idx == 0:
            self.log_dict(self.round_stats)
        return loss

    # ------------------------------------------------------------------ evaluation: greedy accuracy
    def on_validation_epoch_start(self) -> None:
        self._correct: list[bool] = []

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        samples = sample(self.network, [item["prompt"] for item in batch], max_new_tokens=self.eval_max_new_tokens,
                         do_sample=False)
        self._correct += [self.trainer.datamodule.is_correct(group[0], item["target"])
                          for group, item in zip(samples.responses, batch)]

    def on_validation_epoch_end(self) -> None:
        acc = torch.tensor(self._correct, dtype=torch.float32, device=self.device).mean()
        self.log("val/acc", acc, sync_dist=True)
        label = ("M1 (start)" if self.trainer.sanity_checking else f"after round {self.current_epoch + 1}"
                 if self.trainer.state.fn == "fit" else "final")
        self.history.append({"round": label, "val/acc": acc.item(), **self.round_stats})
        if self.trainer.is_global_zero:
            print(f"[cream:{self.consistency}] {label}: val/acc={acc.item():.4f}  " +
                  "  ".join(f"{k}={v:.4f}" for k, v in self.round_stats.items()), flush=True)
