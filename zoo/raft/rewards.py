"""Frozen rewards for RAFT: text in, one float per text out.

- :class:`VaderReward`: the VADER compound sentiment score in [-1, 1] (``vaderSentiment``, lexicon bundled, offline):
  the CPU stand-in for the paper's IMDB sentiment classifier.
- :class:`ClassifierReward`: the logit of one label of a hub sequence classifier (the paper's IMDB setting uses
  ``lvwerra/distilbert-imdb``, label ``POSITIVE``; LMFlow reads the raw score, ``function_to_apply="none"``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

__all__ = ["Reward", "VaderReward", "ClassifierReward"]


class Reward(ABC):
    """The interface: a frozen scorer of whole texts (prompt followed by response)."""

    @abstractmethod
    def __call__(self, texts: list[str]) -> torch.Tensor:
        """One reward per text."""


class VaderReward(Reward):
    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.analyzer.polarity_scores(t)["compound"] for t in texts], dtype=torch.float32)


class ClassifierReward(Reward):
    def __init__(self, model: str = "lvwerra/distilbert-imdb", label: str = "POSITIVE", batch_size: int = 64,
                 device: str = "cuda"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForSequenceClassification.from_pretrained(model).eval().requires_grad_(False)
        self.device = device if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.label_index = self.model.config.label2id[label]
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start: start + self.batch_size], padding=True, truncation=True,
                                   return_tensors="pt").to(self.device)
            scores.append(self.model(**batch).logits[:, self.label_index].float().cpu())
        return torch.cat(scores)
