"""Weak-to-strong data: a binary text task split into test docs and two disjoint training halves.

As in openai/weak-to-strong ``train_simple.py``: ground-truth runs (the weak supervisor and the strong ceiling)
train on half 1; the weak supervisor's soft predictions on half 2 (``predict_dataloader``) are saved and become the
labels the strong student trains on (``split=half2``, ``weak_labels=<file>``). Accuracy is always measured against the
ground truth of the test docs. Tasks:

- ``ag_news``: two AG News topics (default Business vs Sci/Tech, the most confusable pair), label = index in ``classes``;
- ``hh_rlhf``: the official ``anthropic_hh`` formatter: with probability 1/2 the chosen dialogue (label 1), else the
  rejected one (label 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.core.data import StreamDataModule
from zoo.lm.heads import load_tokenizer
from zoo.lm.text_datasets import load_ag_news, load_hh_rlhf
from zoo.lm.tiny import pad_right

__all__ = ["WeakToStrongDataModule", "load_binary_task"]


def load_binary_task(name: str, seed: int, classes: tuple[int, int] = (2, 3)) -> tuple[list[str], np.ndarray]:
    """Texts and 0/1 labels of a task, in a seeded random order."""
    rng = np.random.default_rng(seed)
    if name == "ag_news":
        texts, topics = load_ag_news()
        keep = [i for i, t in enumerate(topics) if t in classes]
        texts, labels = [texts[i] for i in keep], np.array([classes.index(topics[i]) for i in keep])
    elif name == "hh_rlhf":
        pairs = load_hh_rlhf()
        labels = (rng.random(len(pairs)) < 0.5).astype(np.int64)
        texts = [p["chosen"] if y else p["rejected"] for p, y in zip(pairs, labels)]
    else:
        raise ValueError(f"unknown task {name!r}; use ag_news or hh_rlhf")
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], labels[order]


class TokenizedSet(Dataset):
    def __init__(self, input_ids: list[list[int]], labels: np.ndarray, soft_labels: np.ndarray):
        self.input_ids, self.labels, self.soft_labels = input_ids, labels, soft_labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item  # FixedLengthSampler yields (index, seed)
        return {"idx": index, "input_ids": self.input_ids[index], "label": int(self.labels[index]),
                "soft_label": self.soft_labels[index]}


class WeakToStrongDataModule(StreamDataModule):
    """Batches ``{"idx", "input_ids", "attention_mask", "label" (ground truth), "soft_label" (training target)}``.

    Args:
        task: ``ag_news`` or ``hh_rlhf``.
        tokenizer: the backbone's tokenizer (``minilm`` also serves ``tiny-bert``; or a Hugging Face name).
        split: the training half, ``half1`` (ground truth) or ``half2`` (weak labels).
        weak_labels: a ``.pt`` file of half-2 soft labels written by :func:`zoo.weak_to_strong.pgr.save_weak_labels`;
            required for ``half2``, whose ground truth is never trained on.
        n_docs, n_test_docs: training docs (both halves) and test docs (20000 / 10000 in ``train_simple``).
        max_length: tokens kept per doc (``max_ctx``: the official code drops longer docs; here they are truncated).
        batch_size: global training batch per step (split across processes).
        steps_per_epoch: optimizer steps per epoch (default: one pass over the half, ``len(half) // batch_size``).
    """

    def __init__(self, task: str = "ag_news", tokenizer: str = "minilm", split: str = "half1",
                 weak_labels: str | None = None, n_docs: int = 2000, n_test_docs: int = 1000, max_length: int = 64,
                 classes: tuple[int, int] = (2, 3), batch_size: int = 32, eval_batch_size: int = 64,
                 num_workers: int = 0, steps_per_epoch: int | None = None, seed: int = 0):
        super().__init__()
        if split not in ("half1", "half2"):
            raise ValueError(f"split must be half1 or half2, got {split!r}")
        if (split == "half2") != (weak_labels is not None):
            raise ValueError("half2 trains on weak labels (pass weak_labels); half1 trains on ground truth (do not)")
        self.task, self.tokenizer_name, self.split, self.weak_labels = task, tokenizer, split, weak_labels
        self.n_docs, self.n_test_docs, self.max_length, self.classes = n_docs, n_test_docs, max_length, tuple(classes)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self.dataset = task

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "test_set"):
            return
        texts, labels = load_binary_task(self.task, self.seed, self.classes)
        if self.n_docs + self.n_test_docs > len(texts):
            raise ValueError(f"{self.task} has {len(texts)} docs, fewer than n_docs + n_test_docs")
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        used = texts[: self.n_test_docs + self.n_docs]
        ids = self.tokenizer(used, truncation=True, max_length=self.max_length)["input_ids"]
        one_hot = np.eye(2, dtype=np.float32)[labels]
        test, half1, half2 = (slice(0, self.n_test_docs), slice(self.n_test_docs, self.n_test_docs + self.n_docs // 2),
                              slice(self.n_test_docs + self.n_docs // 2, self.n_test_docs + self.n_docs))
        self.test_set = TokenizedSet(ids[test], labels[test], one_hot[test])
        self.half2_inputs = TokenizedSet(ids[half2], labels[half2], one_hot[half2])
        if self.split == "half1":
            self.train_set = TokenizedSet(ids[half1], labels[half1], one_hot[half1])
        else:
            soft = torch.load(Path(self.weak_labels))
            if soft.shape != (len(self.half2_inputs), 2):
                raise ValueError(f"{self.weak_labels}: expected soft labels of shape {(len(self.half2_inputs), 2)}, "
                                 f"got {tuple(soft.shape)} (written for another task, seed or n_docs?)")
            self.train_set = TokenizedSet(ids[half2], labels[half2], soft.float().numpy())
        if self.steps_per_epoch is None:  # one pass over the training half, in global batches
            self.steps_per_epoch = len(self.train_set) // self.batch_size

    def collate(self, items: list[dict]) -> dict:
        input_ids, attention_mask = pad_right([it["input_ids"] for it in items], self.tokenizer.pad_token_id)
        return {"idx": torch.tensor([it["idx"] for it in items]), "input_ids": input_ids,
                "attention_mask": attention_mask, "label": torch.tensor([it["label"] for it in items]),
                "soft_label": torch.tensor(np.stack([it["soft_label"] for it in items]))}

    def train_dataloader(self) -> DataLoader:
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training half has {len(self.train_set)} docs, fewer than one batch of "
                             f"{self.batch_size}: raise n_docs or lower batch_size")
        return self.stream(self.train_set, self.batch_size, self.seed, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set, self.eval_batch_size, collate_fn=self.collate)

    def predict_dataloader(self) -> DataLoader:
        """Half 2's inputs, in order and whole on every process: the weak supervisor's predictions on them become
        the weak labels (:func:`zoo.weak_to_strong.pgr.save_weak_labels` reads one process's outputs)."""
        return DataLoader(self.half2_inputs, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers)
