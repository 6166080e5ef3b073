"""UL2's data: a stream of corpus windows, each turned into one denoising example by a denoiser drawn per sample.

Training: ``batch_size`` random ``block_size``-token windows per step from the first 90% of the corpus (the same
windows, seed for seed, as :class:`zoo.lm.tiny.TextDataModule`); each window's sampler seed draws its start, then
its denoiser (``rates``, uniform by default as in the paper's ``ul2_objective``), then its noise mask, so a draw
never depends on the process count and a resumed run sees the same examples. Layout, from the network:

- decoder-only (:class:`zoo.lm.tiny.CausalLM`): ``mode + inputs + targets + EOS`` in one causal sequence, loss on
  ``targets + EOS`` (``loss_mask``); attention stays causal over the inputs too (no prefix-LM bidirectionality);
- encoder-decoder (:class:`zoo.ul2.module.Seq2SeqLM`): encoder ``mode + inputs + EOS``, ``labels = targets + EOS``
  (-100 on padding), as T5's span corruption writes its features.

Validation (last 10%): (0) next-token loss over ``val_windows`` evenly spaced windows, read in S mode: the input is
``eval_mode`` + the window's first token, the target the rest (the causal baseline: no mode token, i.e. plain LM
loss on the same tokens); (1) a 4-way cloze: a held-out word of 4-8 letters in its context, against three other
held-out words of its length and case, scored by the model's log-likelihood of the whole text (``causal``, in
``eval_mode``) and of the word as a span infilled in ``infill_mode`` (``infill``: inputs ``left <s0> right <s1>``,
targets ``<s0> word <s1>``).
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.core.data import StreamDataModule
from zoo.core.datasets import MissingDatasetError, data_root
from zoo.lm.corpora import load_corpus
from zoo.lm.tiny import pad_right

from .denoisers import UL2_DENOISERS, Denoiser, denoise

__all__ = ["UL2DataModule", "load_text", "cloze_items", "collate"]

_C4_HOW = ("C4 (allenai/c4, en): a shard such as c4/en/c4-train.00000-of-01024.json.gz (one JSON document per line, "
           "key 'text') under ZOO_DATA_DIR, e.g. `huggingface-cli download allenai/c4 en/c4-train.00000-of-01024"
           ".json.gz --repo-type dataset --local-dir $ZOO_DATA_DIR/c4`")


def load_text(corpus: str) -> str:
    """A corpus of :func:`zoo.lm.corpora.load_corpus` by name, or a ``.txt`` / ``.json(l).gz`` file (documents with
    a ``text`` key, one per line) under ``ZOO_DATA_DIR``."""
    if not corpus.endswith((".txt", ".json.gz", ".jsonl.gz")):
        return load_corpus(corpus)
    path = Path(corpus) if Path(corpus).is_absolute() else data_root() / corpus
    if not path.exists():
        raise MissingDatasetError(f"corpus file not found: {path.resolve()}\n  {_C4_HOW}")
    if corpus.endswith(".txt"):
        return path.read_text()
    return "\n".join(json.loads(line)["text"] for line in gzip.open(path, "rt"))


def cloze_items(text: str, num_items: int, left_chars: int, right_chars: int, seed: int = 0) -> list[dict]:
    """``num_items`` cloze questions, evenly spaced over ``text``: ``{"left", "right", "choices"}``, the true word
    first among 4 words of the same length and capitalisation."""
    words = [m for m in re.finditer(r"\b[A-Za-z]{4,8}\b", text)
             if m.start() >= left_chars and m.end() + right_chars <= len(text)]
    def shape(word: str) -> tuple[int, str]:  # length and capitalisation: "lord", "Lord", "LORD"
        return len(word), "upper" if word.isupper() else "title" if word[0].isupper() else "lower"

    pool: dict[tuple[int, str], list[str]] = {}
    for word in sorted({m.group() for m in words}):
        pool.setdefault(shape(word), []).append(word)
    rng = np.random.default_rng(seed)
    items = []
    for i in np.linspace(0, len(words) - 1, min(num_items, len(words))).astype(int):
        m = words[i]
        others = [w for w in pool[shape(m.group())] if w.lower() != m.group().lower()]
        if len(others) < 3:
            continue
        distractors = rng.choice(others, 3, replace=False).tolist()
        items.append({"left": text[m.start() - left_chars: m.start()], "right": text[m.end(): m.end() + right_chars],
                      "choices": [m.group()] + distractors})
    return items


def collate(examples: list[dict], pad_id: int, encoder_decoder: bool) -> dict:
    """Examples ``{"mode", "inputs", "targets"}`` (id lists; EOS already where it belongs) -> one batch."""
    if encoder_decoder:
        input_ids, attention_mask = pad_right([e["mode"] + e["inputs"] for e in examples], pad_id)
        labels, label_mask = pad_right([e["targets"] for e in examples], pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels.masked_fill(label_mask == 0, -100)}
    input_ids, attention_mask = pad_right([e["mode"] + e["inputs"] + e["targets"] for e in examples], pad_id)
    loss_mask = torch.zeros_like(attention_mask)
    for i, e in enumerate(examples):
        start = len(e["mode"]) + len(e["inputs"])
        loss_mask[i, start: start + len(e["targets"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


class _DenoisedWindows(Dataset):
    """Random windows of a token stream, each denoised by a denoiser drawn from the sample's seed."""

    def __init__(self, ids: np.ndarray, block_size: int, make_example, num_denoisers: int, rates: np.ndarray):
        self.ids, self.block_size, self.make_example = ids, block_size, make_example
        self.num_denoisers, self.rates = num_denoisers, rates

    def __len__(self) -> int:
        return len(self.ids) - self.block_size

    def __getitem__(self, item) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, item)
        rng = np.random.default_rng(seed)
        start = int(rng.integers(len(self)))  # first draw: the window TextDataModule picks for this seed
        which = int(rng.choice(self.num_denoisers, p=self.rates))
        return {"idx": index, "denoiser": which,
                **self.make_example(self.ids[start: start + self.block_size], which, rng)}


class UL2DataModule(StreamDataModule):
    """The mixture-of-denoisers stream (see the module docstring).

    Args:
        corpus: ``tiny_shakespeare``, ``c4_demo`` or a ``.txt`` / ``.json.gz`` file under ``ZOO_DATA_DIR``
            (the paper: C4).
        denoisers: the mixture; None = the paper's seven (:data:`~zoo.ul2.denoisers.UL2_DENOISERS`).
        rates: sampling probability of each denoiser (normalised); None = uniform, the appendix code's default.
        block_size: tokens per raw window (before corruption).
        batch_size: global windows per step; eval_batch_size per process.
        eval_mode, infill_mode: mode tokens of the causal (S) and infilling (R) evaluations.
        val_windows, cloze_questions: sizes of the two validation sets.
    """

    def __init__(self, corpus: str = "tiny_shakespeare", denoisers: list[Denoiser] | None = None,
                 rates: Sequence[float] | None = None, block_size: int = 128, batch_size: int = 32,
                 eval_batch_size: int = 64, steps_per_epoch: int = 500, val_windows: int = 128,
                 cloze_questions: int = 256, eval_mode: str = "[S2S]", infill_mode: str = "[NLU]",
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.denoisers = [d if isinstance(d, Denoiser) else Denoiser(**dict(vars(d) if hasattr(d, "__dict__") else d))
                          for d in (UL2_DENOISERS if denoisers is None else denoisers)]
        if not self.denoisers:
            raise ValueError("denoisers must name at least one Denoiser")
        rates = np.ones(len(self.denoisers)) if rates is None else np.asarray(rates, dtype=float)
        if rates.shape != (len(self.denoisers),) or (rates < 0).any() or rates.sum() <= 0:
            raise ValueError(f"rates must be {len(self.denoisers)} non-negative numbers, one per denoiser, got {rates}")
        self.rates = rates / rates.sum()
        self.corpus, self.block_size, self.batch_size = corpus, block_size, batch_size
        self.eval_batch_size, self.steps_per_epoch = eval_batch_size, steps_per_epoch
        self.val_windows, self.cloze_questions = val_windows, cloze_questions
        self.eval_mode, self.infill_mode = eval_mode, infill_mode
        self.num_workers, self.seed = num_workers, seed
        self.dataset = corpus

    # ------------------------------------------------------------------ tokens
    def setup(self, stage: str | None = None) -> None:
        network = self.trainer.lightning_module.network
        self.tokenizer = network.tokenizer
        self.encoder_decoder = bool(getattr(getattr(getattr(network, "model", None), "config", None),
                                            "is_encoder_decoder", False))
        self.pad_id, self.eos_id = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.sentinels = np.array(self.tokenizer.convert_tokens_to_ids([f"<extra_id_{k}>" for k in range(100)]))
        self.denoiser_modes = [self.encode(d.mode) for d in self.denoisers]
        text = load_text(self.corpus)
        cut = int(len(text) * 0.9)
        train_ids, self.val_ids = self.encode(text[:cut], as_array=True), self.encode(text[cut:], as_array=True)
        self.train_set = _DenoisedWindows(train_ids, self.block_size, self._example, len(self.denoisers), self.rates)
        self.cloze = cloze_items(text[cut:], self.cloze_questions, self.block_size // 2, self.block_size // 4)

    def encode(self, text: str, as_array: bool = False):
        ids = self.tokenizer(text, add_special_tokens=False).input_ids if text else []
        return np.asarray(ids, dtype=np.int64) if as_array else ids

    def _example(self, window: np.ndarray, which: int, rng) -> dict:
        inputs, targets = denoise(window, self.denoisers[which], rng, self.sentinels)
        eos = [] if self.denoisers[which].kind == "causal" else [self.eos_id]  # a causal window ends mid-text
        return self._layout(self.denoiser_modes[which], inputs.tolist(), targets.tolist() + eos)

    def _layout(self, mode: list[int], inputs: list[int], targets: list[int]) -> dict:
        if self.encoder_decoder:  # T5 ends the encoder's inputs with EOS too
            inputs = inputs + [self.eos_id]
        return {"mode": mode, "inputs": inputs, "targets": targets}

    # ------------------------------------------------------------------ loaders
    def _collate_train(self, examples: list[dict]) -> dict:
        batch = collate(examples, self.pad_id, self.encoder_decoder)
        batch["idx"] = torch.tensor([e["idx"] for e in examples])
        batch["denoiser"] = [self.denoisers[e["denoiser"]].name for e in examples]
        return batch

    def train_dataloader(self) -> DataLoader:
        return self.stream(self.train_set, self.batch_size, self.seed, collate_fn=self._collate_train)

    def causal_example(self, ids: list[int]) -> dict:
        """S-mode reading of a text: input = mode + first token, target = the rest (no EOS)."""
        return self._layout(self.encode(self.eval_mode), ids[:1], ids[1:])

    def infill_example(self, left: str, word: str, right: str) -> dict:
        s0, s1 = self.sentinels[:2].tolist()
        return self._layout(self.encode(self.infill_mode), self.encode(left) + [s0] + self.encode(right) + [s1],
                            [s0] + self.encode(word) + [s1])

    def _collate_windows(self, windows: list[list[int]]) -> dict:
        return collate([self.causal_example(w) for w in windows], self.pad_id, self.encoder_decoder)

    def _collate_cloze(self, items: list[dict]) -> dict:
        """Both scorings of every choice, items-major: rows ``i * K + k``."""
        causal = [self.causal_example(self.encode(it["left"] + w + it["right"])) for it in items for w in it["choices"]]
        infill = [self.infill_example(it["left"], w, it["right"]) for it in items for w in it["choices"]]
        return {"causal": collate(causal, self.pad_id, self.encoder_decoder),
                "infill": collate(infill, self.pad_id, self.encoder_decoder), "num_choices": len(items[0]["choices"])}

    def val_dataloader(self) -> list[DataLoader]:
        starts = np.linspace(0, len(self.val_ids) - self.block_size - 1, self.val_windows).astype(int)
        windows = [self.val_ids[s: s + self.block_size].tolist() for s in starts]
        return [self.eval_loader(windows, self.eval_batch_size, collate_fn=self._collate_windows),
                self.eval_loader(self.cloze, max(1, self.eval_batch_size // 8), collate_fn=self._collate_cloze)]
