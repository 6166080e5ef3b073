"""The iteration driver of self-training LM papers: one Lightning epoch = one round of sample -> score -> train.

With ``trainer.reload_dataloaders_every_n_epochs: 1`` Lightning asks for a new train loader every epoch; this data
module then hands the round's fresh prompts to the LightningModule, which samples from its *current* weights,
scores, selects and returns the round's training examples (``module.build_round(prompts, round_index)``) and how
to batch them (``module.collate``). The data code knows nothing of the method.

Prompts: the ``prompts`` split of a prompt set (see :func:`zoo.lm.corpora.load_prompts`) in a fixed shuffled order;
round r takes the next ``prompts_per_round`` of them (wrapping around), each process its own share. Validation
uses the first ``eval_prompts`` of the ``test`` split. Each round trains ``steps_per_epoch`` batches drawn with
replacement, or, if None, ``epochs_per_round`` passes over the round's examples.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from zoo.core.data import dist_info

from .corpora import final_number, load_prompts

__all__ = ["RoundDataModule"]


class RoundDataModule(L.LightningDataModule):
    """Args:
        prompts: prompt set name (``tiny_shakespeare``, ``gsm8k_arithmetic``, ``gsm8k``, a ``.txt`` path).
        prompts_per_round: prompts sampled per round, over all processes.
        prompt_chars, target_chars: for text prompt sets, the prompt length and the held-out continuation length.
        answer_position: which number of a response is its answer (``first`` for bare sums, ``last`` for GSM8K).
    """

    def __init__(self, prompts: str = "tiny_shakespeare", prompts_per_round: int = 64, eval_prompts: int = 64,
                 batch_size: int = 8, eval_batch_size: int = 32, steps_per_epoch: int | None = None,
                 epochs_per_round: int = 1, prompt_chars: int = 24, target_chars: int = 48,
                 answer_position: str = "last", num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.prompts, self.prompts_per_round, self.eval_prompts = prompts, prompts_per_round, eval_prompts
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch, self.epochs_per_round = steps_per_epoch, epochs_per_round
        self.prompt_chars, self.target_chars, self.answer_position = prompt_chars, target_chars, answer_position
        self.num_workers, self.seed = num_workers, seed
        self.dataset = prompts
        self._round: tuple[int, list[dict]] | None = None

    def setup(self, stage: str) -> None:
        kwargs = {"prompt_chars": self.prompt_chars, "target_chars": self.target_chars}
        pool = load_prompts(self.prompts, "prompts", **kwargs)
        self.pool = [pool[i] for i in np.random.default_rng(self.seed).permutation(len(pool))]
        self.eval_set = load_prompts(self.prompts, "test", **kwargs)[: self.eval_prompts]

    def round_prompts(self, round_index: int) -> list[dict]:
        """This process's share of round ``round_index``'s prompts (fresh prompts every round)."""
        rank, world = dist_info()
        start = round_index * self.prompts_per_round
        picked = [self.pool[(start + i) % len(self.pool)] for i in range(self.prompts_per_round)]
        return picked[rank::world]

    def is_correct(self, response: str, target: str) -> bool:
        answer = final_number(response, self.answer_position)
        return answer is not None and float(answer) == float(target)

    def train_dataloader(self) -> DataLoader:
        module, round_index = self.trainer.lightning_module, self.trainer.current_epoch
        # Lightning may ask twice for the same epoch's loader (e.g. to count the steps of an LR schedule); a round
        # is sampled once, since building it also advances the method's state
        if self._round is None or self._round[0] != round_index:
            self._round = (round_index, module.build_round(self.round_prompts(round_index), round_index))
        examples = self._round[1]
        if not examples:
            raise RuntimeError(f"round {round_index} produced no training examples; sample more prompts per round")
        _, world = dist_info()
        batch = max(1, self.batch_size // world)
        if self.steps_per_epoch:
            sampler = RandomSampler(examples, replacement=True, num_samples=self.steps_per_epoch * batch,
                                    generator=torch.Generator().manual_seed(self.seed * 1_000_003 + round_index))
        else:
            sampler = RandomSampler(examples, num_samples=self.epochs_per_round * len(examples),
                                    generator=torch.Generator().manual_seed(self.seed * 1_000_003 + round_index))
        return DataLoader(examples, batch_size=batch, sampler=sampler, collate_fn=module.collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = dist_info()
        return DataLoader(self.eval_set[rank::world], batch_size=self.eval_batch_size, collate_fn=list)
