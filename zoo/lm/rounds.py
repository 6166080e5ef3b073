"""The iteration driver of self-training LM papers: one Lightning epoch = one round of sample -> score -> train.

With ``trainer.reload_dataloaders_every_n_epochs: 1`` Lightning asks for a new train loader every epoch; this data
module then hands the round's fresh prompts to the LightningModule, which samples from its *current* weights,
scores, selects and returns the round's training examples (``module.build_round(prompts, round_index)``) and how
to batch them (``module.collate``). The data code knows nothing of the method.

Prompts: the ``prompts`` split of a prompt set (see :func:`zoo.lm.corpora.load_prompts`) in a fixed shuffled order;
round r takes the next ``prompts_per_round`` of them (wrapping around), each process its own share. Validation
uses the first ``eval_prompts`` of the ``test`` split.

Training follows the zoo's data contract (:mod:`zoo.core.data`): the examples every process built are pooled, and
each step trains on a global batch of ``batch_size`` of them drawn by a :class:`~zoo.core.data.FixedLengthSampler`
seeded by (seed, round), each process taking its strided share. A round is ``steps_per_epoch`` steps, or, if None,
``epochs_per_round`` passes over the pooled examples (at least one step; the last partial batch is dropped).

Resume mid-round: a round's examples are sampled from the weights at the round's start, which a run interrupted
mid-round no longer has, so they cannot be rebuilt on resume (on-policy sampling from the restored weights would give
other examples, and building a round also advances the method's state, e.g. CREAM's previous model). The round
therefore travels in the checkpoint (:meth:`RoundDataModule.state_dict`: its index, the step it started at and the
pooled examples), and the resumed run trains on the same examples from the batch the interrupted run would have
trained on next.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from zoo.core.data import StreamDataModule
from zoo.core.distributed import is_distributed

from .corpora import final_number, load_prompts

__all__ = ["RoundDataModule"]


@dataclass
class Round:
    """One round's training data, built once from the weights at the round's start."""
    index: int
    first_step: int  # trainer.global_step when the round started
    examples: list[dict]  # every process's examples, in rank order
    steps: int  # batches of this round


class RoundExamples(Dataset):
    """A round's examples, looked up by the sampler's ``(index, seed)`` draws (the seed is unused)."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key) -> dict:
        return self.examples[key[0] if isinstance(key, tuple) else key]


def pool_over_processes(examples: list[dict]) -> list[dict]:
    """Every process's examples concatenated in rank order: the same list on every process."""
    if not is_distributed():
        return examples
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, examples)
    return [example for part in parts for example in part]


class RoundDataModule(StreamDataModule):
    """Args:
        prompts: prompt set name (``tiny_shakespeare``, ``gsm8k_arithmetic``, ``gsm8k``, a ``.txt`` path).
        prompts_per_round: prompts sampled per round, over all processes.
        batch_size: global training batch per step, drawn from the round's pooled examples.
        steps_per_epoch: steps per round (None: ``epochs_per_round`` passes over the round's examples).
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
        self.steps_per_round, self.epochs_per_round = steps_per_epoch, epochs_per_round
        self.steps_per_epoch = steps_per_epoch  # the contract's name; set per round when None
        self.prompt_chars, self.target_chars, self.answer_position = prompt_chars, target_chars, answer_position
        self.num_workers, self.seed = num_workers, seed
        self.dataset = prompts
        self._round: Round | None = None
        self._first_round_steps: int | None = None  # what Lightning's step estimate counted (see train_dataloader)
        self._resumed_at_step: int | None = None  # global step of the checkpoint this run resumed from

    def setup(self, stage: str | None = None) -> None:
        kwargs = {"prompt_chars": self.prompt_chars, "target_chars": self.target_chars}
        pool = load_prompts(self.prompts, "prompts", **kwargs)
        self.pool = [pool[i] for i in np.random.default_rng(self.seed).permutation(len(pool))]
        self.eval_set = load_prompts(self.prompts, "test", **kwargs)[: self.eval_prompts]

    def round_prompts(self, round_index: int) -> list[dict]:
        """This process's share of round ``round_index``'s prompts (fresh prompts every round)."""
        rank, world = self.world()
        start = round_index * self.prompts_per_round
        picked = [self.pool[(start + i) % len(self.pool)] for i in range(self.prompts_per_round)]
        return picked[rank::world]

    def is_correct(self, response: str, target: str) -> bool:
        answer = final_number(response, self.answer_position)
        return answer is not None and float(answer) == float(target)

    # ------------------------------------------------------------------ training rounds
    def _restoring(self) -> bool:
        """True while Lightning, resuming, has restored the weights and this data module but not yet its loops
        (global step and epoch still 0): it builds a train loader then to count the steps of an LR schedule."""
        return self._resumed_at_step is not None and self.trainer.global_step < self._resumed_at_step

    def _global_step(self) -> int:
        """The step training continues from (the checkpoint's while Lightning is restoring)."""
        return max(self.trainer.global_step, self._resumed_at_step or 0)

    def _build_round(self, round_index: int) -> Round:
        module = self.trainer.lightning_module
        examples = pool_over_processes(module.build_round(self.round_prompts(round_index), round_index))
        if not examples:
            raise RuntimeError(f"round {round_index} produced no training examples; sample more prompts per round")
        steps = self.steps_per_round or max(1, self.epochs_per_round * len(examples) // self.batch_size)
        return Round(round_index, self.trainer.global_step, examples, steps)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("RoundDataModule builds a new round every epoch: set "
                             "trainer.reload_dataloaders_every_n_epochs: 1")
        restoring = self._restoring()
        # Lightning may ask twice for the same epoch's loader (e.g. to count the steps of an LR schedule); a round
        # is sampled once, since building it also advances the method's state
        if not restoring and (self._round is None or self._round.index != trainer.current_epoch):
            self._round = self._build_round(trainer.current_epoch)
        if self._first_round_steps is None:
            self._first_round_steps = self._round.steps
        # While restoring, Lightning builds this loader to count an LR schedule's steps (max_epochs x its length):
        # it gets the first round's length, the one the interrupted run counted, so the schedule is the same. (It
        # is rebuilt once the loops are restored, unless the run resumes in round 0, whose length it has anyway.)
        self.steps_per_epoch = self._first_round_steps if restoring else self._round.steps
        return self.stream(RoundExamples(self._round.examples), self.batch_size, self.seed,
                           collate_fn=trainer.lightning_module.collate)

    def epoch_and_offset(self) -> tuple[int, int]:
        """(round, batches of it already trained on). Rounds may differ in length, so the offset is counted from the
        step the round started at (not from ``global_step % steps_per_epoch``)."""
        if self.trainer is None or self._round is None:
            return 0, 0
        return self._round.index, (self._global_step() - self._round.first_step) * self.trainer.accumulate_grad_batches

    def state_dict(self) -> dict:
        """The current round (pooled examples included) and where training stood, saved in every checkpoint."""
        if self._round is None or self.trainer is None:
            return {}
        return {"round": asdict(self._round), "first_round_steps": self._first_round_steps,
                "global_step": self.trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        self._round = Round(**state["round"])
        self._first_round_steps = state["first_round_steps"]
        self._resumed_at_step = state["global_step"]

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.eval_set, self.eval_batch_size, collate_fn=list)
