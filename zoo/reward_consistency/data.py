"""Preference pairs, the Contrast Instructions benchmark, ConvexDA and RewardFusion's retrieval plan.

Tasks:
- ``hh_rlhf`` (offline, CPU): HH-RLHF harmless-base pairs, a seeded train/test split. The contrast set is built the
  way the paper built its benchmark: each test prompt q is paired with its most similar *other* test prompt p
  (MiniLM cosine, at least ``contrast_min_similarity``), and their preferred responses y_q, y_p are the gold answers.
- ``twitter``, ``wmt``, ``realsumm`` (the paper's files, from shadowkiller33/Contrast-Instruction ``data/``, placed under
  ``$ZOO_DATA_DIR/contrast_instructions/``): ``human_preferences/<task>/{train,test}.json`` pairs
  (``question``, preferred ``response_j``, other ``response_k``) and ``contrast_instructions/<file>`` items
  (``query``, ``retrieval``, preferred ``query_response_k``, ``retrieval_response_k``).

Evaluation texts are scored once each (a de-duplicated table); every metric is a comparison of two rows of
``plan`` (see :mod:`zoo.reward_consistency.module`). With RewardFusion, each evaluation text's reward is the
similarity-weighted mean over itself (similarity 1) and up to ``fusion_top_k`` training texts (template(question) +
preferred response) with cosine similarity >= ``fusion_threshold``.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from zoo.core.data import StreamDataModule
from zoo.core.datasets import require_file
from zoo.lm.embeddings import CosineIndex, SentenceEmbedder
from zoo.lm.heads import load_tokenizer
from zoo.lm.text_datasets import load_hh_rlhf, split_dialogue
from zoo.lm.tiny import pad_right

from .augment import convex_hull_selection, spelling_noise

__all__ = ["PreferenceDataModule", "TEMPLATES"]

TEMPLATES = {"hh_rlhf": "{q}{r}", "stack": "Question: {q}\n\nAnswer: {r}",
             "twitter": "Paraphrase the following sentence: {q}\n\nAnswer: {r}",
             "realsumm": "Summarize the paragraph: {q}\n\nAnswer: {r}",
             "wmt": "Please translate the sentences to English: {q}\n\nAnswer: {r}"}
CONTRAST_FILES = {"twitter": "para_contrast.json", "realsumm": "sum_contrast.json", "wmt": "wmt_contrast.json"}
OFFICIAL_HOW = "the paper's data: shadowkiller33/Contrast-Instruction data/ (copy it to $ZOO_DATA_DIR/contrast_instructions/)"


def _official(task: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(train pairs, test pairs, contrast items) as dicts with q / chosen / rejected and q / p / y_q / y_p."""
    def pairs(split):
        path = require_file(f"contrast_instructions/human_preferences/{task}/{split}.json", OFFICIAL_HOW)
        rows = json.loads(path.read_text())
        return [{"q": r["question"], "chosen": r["response_j"], "rejected": r["response_k"]} for r in rows]

    path = require_file(f"contrast_instructions/contrast_instructions/{CONTRAST_FILES[task]}", OFFICIAL_HOW)
    items = json.loads(path.read_text())
    contrast = [{"q": r["query"], "p": r["retrieval"], "y_q": r["query_response_k"], "y_p": r["retrieval_response_k"]}
                for r in items]
    return pairs("train"), pairs("test"), contrast


def _hh_rlhf(n_test: int, seed: int, min_similarity: float, embedder) -> tuple[list[dict], list[dict], list[dict]]:
    rows = []
    for pair in load_hh_rlhf():
        prompt, chosen = split_dialogue(pair["chosen"])
        prompt_rejected, rejected = split_dialogue(pair["rejected"])
        if prompt == prompt_rejected and chosen != rejected:  # 5 of 2,312 pairs differ before the last turn
            rows.append({"q": prompt, "chosen": chosen, "rejected": rejected})
    order = np.random.default_rng(seed).permutation(len(rows))
    test, train = [rows[i] for i in order[:n_test]], [rows[i] for i in order[n_test:]]
    embeddings = embedder.encode([r["q"] for r in test])
    contrast = []
    for i, neighbours in enumerate(CosineIndex(embeddings).search(embeddings, top_k=10, threshold=min_similarity)):
        for j, _ in neighbours:  # the most similar prompt that is a different prompt with a different gold answer
            if test[j]["q"] != test[i]["q"] and test[j]["chosen"] != test[i]["chosen"]:
                contrast.append({"q": test[i]["q"], "p": test[j]["q"],
                                 "y_q": test[i]["chosen"], "y_p": test[j]["chosen"]})
                break
    return train, test, contrast


def convex_augment(train: list[dict], num_pairs: int, num_variants: int, rule: str, seed: int, embedder) -> list[dict]:
    """ConvexDA (``rule="convex"``): per pair, ``num_variants`` spelling-noised copies of the preferred response; the
    copies on the convex hull of their 2-D PCA embedding each become a pair (prompt, copy preferred over the original
    rejected response). ``rule="random"`` keeps as many copies, drawn at random (the same-budget control)."""
    rng = np.random.default_rng(seed)
    extra = []
    for pair in train[:num_pairs]:
        variants = list(dict.fromkeys(spelling_noise(pair["chosen"], rng) for _ in range(num_variants)))
        keep = convex_hull_selection(embedder.encode(variants))
        if rule == "random":
            keep = sorted(rng.choice(len(variants), size=len(keep), replace=False).tolist())
        extra += [{"q": pair["q"], "chosen": variants[v], "rejected": pair["rejected"]} for v in keep]
    return extra


class _Pairs(Dataset):
    def __init__(self, chosen: list[list[int]], rejected: list[list[int]]):
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item  # FixedLengthSampler yields (index, seed)
        return {"idx": index, "chosen": self.chosen[index], "rejected": self.rejected[index]}


class _Texts(Dataset):
    def __init__(self, ids: list[list[int]]):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        return {"idx": index, "input_ids": self.ids[index]}


class PreferenceDataModule(StreamDataModule):
    """Training batches ``{"idx", "input_ids", "attention_mask"}`` (B chosen rows, then their B rejected rows);
    validation batches of evaluation texts (same keys); ``self.plan`` says how they are compared.

    Args:
        task: ``hh_rlhf`` (offline) or one of the paper's ``twitter``, ``wmt``, ``realsumm``.
        tokenizer: the reward model's tokenizer (``minilm`` or a Hugging Face name); truncation keeps the end.
        n_test: test pairs of ``hh_rlhf`` (the rest train); ``n_train``: cap on training pairs (None: all).
        augmentation: ``none``, ``convex`` (ConvexDA) or ``random`` (same number of noisy copies, chosen at random).
        augment_pairs, augment_variants: ConvexDA's first 500 pairs, 5 copies each.
        reward_fusion: also plan RewardFusion's fused rewards (``fusion_top_k`` 5, ``fusion_threshold`` 0.9).
        contrast_min_similarity: ``hh_rlhf`` contrast pairs need at least this prompt similarity.
        batch_size: global number of training pairs per step (split across processes).
        steps_per_epoch: optimizer steps per epoch (default: one pass over the pairs, ``len(pairs) // batch_size``).
    """

    def __init__(self, task: str = "hh_rlhf", tokenizer: str = "minilm", max_length: int = 128, n_test: int = 512,
                 n_train: int | None = None, augmentation: str = "none", augment_pairs: int = 500,
                 augment_variants: int = 5, reward_fusion: bool = False, fusion_top_k: int = 5,
                 fusion_threshold: float = 0.9, contrast_min_similarity: float = 0.6, batch_size: int = 16,
                 eval_batch_size: int = 64, num_workers: int = 0, steps_per_epoch: int | None = None, seed: int = 0):
        super().__init__()
        if augmentation not in ("none", "convex", "random"):
            raise ValueError(f"augmentation must be none, convex or random, got {augmentation!r}")
        self.task, self.tokenizer_name, self.max_length = task, tokenizer, max_length
        self.n_test, self.n_train = n_test, n_train
        self.augmentation, self.augment_pairs, self.augment_variants = augmentation, augment_pairs, augment_variants
        self.reward_fusion, self.fusion_top_k, self.fusion_threshold = reward_fusion, fusion_top_k, fusion_threshold
        self.contrast_min_similarity = contrast_min_similarity
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self.dataset = task

    def text(self, question: str, response: str) -> str:
        return TEMPLATES[self.task].format(q=question, r=response)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "plan"):
            return
        embedder = SentenceEmbedder()
        if self.task == "hh_rlhf":
            train, test, contrast = _hh_rlhf(self.n_test, self.seed, self.contrast_min_similarity, embedder)
        else:
            train, test, contrast = _official(self.task)
        original = train[: self.n_train]
        train = original
        if self.augmentation != "none":
            train = original + convex_augment(original, self.augment_pairs, self.augment_variants, self.augmentation,
                                              self.seed, embedder)
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.tokenizer.truncation_side = "left"  # keep the end of long dialogues: the response being judged
        encode = lambda texts: self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        self.train_set = _Pairs(encode([self.text(p["q"], p["chosen"]) for p in train]),
                                encode([self.text(p["q"], p["rejected"]) for p in train]))
        self.num_train_pairs, self.num_contrast = len(train), len(contrast)
        if self.steps_per_epoch is None:  # one pass over the training pairs, in global batches
            self.steps_per_epoch = len(self.train_set) // self.batch_size
        self._plan_evaluation(original, test, contrast, embedder)

    def _plan_evaluation(self, train, test, contrast, embedder) -> None:
        """A table of unique texts to score, and for each compared quantity its (row, weight) entries.

        RewardFusion retrieves from the original training pairs (never from ConvexDA's noisy copies)."""
        texts, rows = {}, {}

        def entry(text: str) -> int:
            return texts.setdefault(text, len(texts))

        # Item order interleaves the comparisons, so any prefix of the table completes some of them.
        pairs = {"rm": [], "instruction": [], "response": []}
        quantities = []

        def quantity(text: str) -> int:
            if text not in rows:
                rows[text] = len(quantities)
                quantities.append(text)
                entry(text)
            return rows[text]

        for k in range(max(len(test), len(contrast))):
            if k < len(test):
                pairs["rm"].append((quantity(self.text(test[k]["q"], test[k]["chosen"])),
                                    quantity(self.text(test[k]["q"], test[k]["rejected"]))))
            if k < len(contrast):
                c = contrast[k]
                reference = quantity(self.text(c["q"], c["y_q"]))
                pairs["instruction"].append((reference, quantity(self.text(c["p"], c["y_q"]))))
                if c["y_q"] != c["y_p"]:  # identical responses are skipped, as in the paper's scripts
                    pairs["response"].append((reference, quantity(self.text(c["q"], c["y_p"]))))
        plan = {name: torch.tensor(p, dtype=torch.long).reshape(-1, 2) for name, p in pairs.items()}
        # plain reward: each quantity is its own text with weight 1
        plan["plain"] = (torch.arange(len(quantities)), torch.tensor([texts[t] for t in quantities]),
                         torch.ones(len(quantities)))
        if self.reward_fusion:
            corpus = [self.text(p["q"], p["chosen"]) for p in train]
            index = CosineIndex(embedder.encode(corpus))
            neighbours = index.search(embedder.encode(quantities), self.fusion_top_k, self.fusion_threshold)
            q_rows, t_rows, sims = [], [], []
            for row, (text, found) in enumerate(zip(quantities, neighbours)):
                members = {}
                for corpus_index, sim in found:
                    members.setdefault(corpus[corpus_index], sim)  # a duplicated neighbour counts once
                members[text] = 1.0  # the scored text itself, similarity 1.0
                for member, sim in members.items():
                    q_rows.append(row)
                    t_rows.append(entry(member))
                    sims.append(sim)
            q_rows, sims = torch.tensor(q_rows), torch.tensor(sims, dtype=torch.float32)
            norm = torch.zeros(len(quantities)).index_add_(0, q_rows, sims)
            plan["fused"] = (q_rows, torch.tensor(t_rows), sims / norm[q_rows])
            self.fusion_hit_rate = float((torch.bincount(q_rows, minlength=len(quantities)) > 1).float().mean())
        self.plan, self.num_quantities = plan, len(quantities)
        self.test_pairs, self.contrast, self.quantity_texts = test, contrast, quantities
        self.eval_set = _Texts(self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"])

    def _collate_texts(self, sequences):
        input_ids, attention_mask = pad_right(sequences, self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def collate_pairs(self, items: list[dict]) -> dict:
        """The chosen texts then the rejected texts, padded together for one forward pass."""
        return {"idx": torch.tensor([it["idx"] for it in items]),
                **self._collate_texts([it["chosen"] for it in items] + [it["rejected"] for it in items])}

    def collate_texts(self, items: list[dict]) -> dict:
        return {"idx": torch.tensor([it["idx"] for it in items]),
                **self._collate_texts([it["input_ids"] for it in items])}

    def train_dataloader(self) -> DataLoader:
        if self.steps_per_epoch < 1:
            raise ValueError(f"{len(self.train_set)} training pairs are fewer than one batch of {self.batch_size}: "
                             f"raise n_train or lower batch_size")
        return self.stream(self.train_set, self.batch_size, self.seed, collate_fn=self.collate_pairs)

    def val_dataloader(self) -> DataLoader:
        """The whole table on every process: the module fills its rewards by row and compares rows of ``plan``
        without gathering, so the evaluation set is not sharded."""
        return DataLoader(self.eval_set, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate_texts,
                          num_workers=self.num_workers)
