"""Offline text for the language-model papers: corpora to pre-train on and prompt sets with checkable targets.

Everything is real text found under ``ZOO_DATA_DIR`` (see ``../shared/data``); a missing file stops with the path.

- :func:`load_corpus`: ``tiny_shakespeare`` (1.1 MB of plays) or ``c4_demo`` (300 C4 documents).
- :func:`load_prompts`: lists of ``{"prompt", "target"}``:
  ``<corpus>`` -> a real line of text cut after ``prompt_chars`` characters, target = the text that followed;
  ``gsm8k_arithmetic`` -> the two-operand ``+``/``-`` calculator annotations of GSM8K solutions (``<<48+24=72>>``),
  prompt ``"48+24="``, target ``"72"``; ``gsm8k`` -> full GSM8K questions, target the final number;
  ``two_digit_arithmetic`` -> every ``a+b`` and ``a-b`` (a >= b) with a, b < 100 rendered as text, split in a
  fixed order into ``sft`` (3000) and ``prompts`` (the rest), tested on the *real* two-digit annotations of the GSM8K
  test set (none of which is in the other splits); a path ending in ``.txt`` -> one document per line (e.g. IMDB
  reviews exported by the user).
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np

from zoo.core.datasets import MissingDatasetError, require_file, data_root

__all__ = ["load_corpus", "load_prompts", "final_number", "ARITHMETIC_SPLITS"]

_GSM8K_HOW = "GSM8K: openai/grade-school-math, grade_school_math/data/{train,test}.jsonl, gzipped (see shared/data)."
# disjoint parts of the GSM8K train annotations: a labelled SFT set, and unlabelled prompts for self-training
ARITHMETIC_SPLITS = ("sft", "prompts", "test")


def load_corpus(name: str) -> str:
    if name == "tiny_shakespeare":
        return require_file("tiny_shakespeare/input.txt", "karpathy/char-rnn data/tinyshakespeare/input.txt").read_text()
    if name == "c4_demo":
        path = require_file("instruct_demo/c4_demo.jsonl.gz", "hiyouga/LLaMA-Factory data/c4_demo.jsonl, gzipped")
        return "\n".join(json.loads(line)["text"] for line in gzip.open(path, "rt"))
    raise ValueError(f"unknown corpus {name!r}; use tiny_shakespeare or c4_demo")


def _gsm8k(split: str) -> list[dict]:
    path = require_file(f"gsm8k/{split}.jsonl.gz", _GSM8K_HOW)
    return [json.loads(line) for line in gzip.open(path, "rt")]


def final_number(text: str, position: str = "last") -> str | None:
    """The first or last number in ``text`` (commas removed), as GSM8K answers are compared."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    if not numbers:
        return None
    return numbers[0] if position == "first" else numbers[-1]


def _arithmetic(split: str, max_operand: int) -> list[dict]:
    """Unique, verified ``a+b=c`` / ``a-b=c`` annotations, in order of first appearance."""
    source = "test" if split.startswith("test") else "train"
    seen, items = set(), []
    for row in _gsm8k(source):
        for expression in re.findall(r"<<([^<>]*)>>", row["answer"]):
            match = re.fullmatch(r"(\d+)([-+])(\d+)=(\d+)", expression)
            if not match:
                continue
            a, op, b, c = match.groups()
            if max(int(a), int(b)) >= max_operand or (int(a) + int(b) if op == "+" else int(a) - int(b)) != int(c):
                continue
            if (a, op, b) not in seen:
                seen.add((a, op, b))
                items.append({"prompt": f"{a}{op}{b}=", "target": c})
    if split == "test_all":
        return items
    if split == "test":
        train = _arithmetic("sft", max_operand) + _arithmetic("prompts", max_operand)
        train_prompts = {item["prompt"] for item in train}
        return [item for item in items if item["prompt"] not in train_prompts]
    # a fixed permutation, then half labelled (SFT) and half unlabelled (self-training prompts)
    order = np.random.default_rng(0).permutation(len(items))
    half = len(items) // 2
    return [items[i] for i in (order[:half] if split == "sft" else order[half:])]


def _two_digit(split: str) -> list[dict]:
    test = _arithmetic("test_all", 100)
    if split == "test":
        return test
    held_out = {item["prompt"] for item in test}
    items = [{"prompt": f"{a}{op}{b}=", "target": str(a + b if op == "+" else a - b)}
             for a in range(100) for b in range(100) for op in "+-" if op == "+" or a >= b]
    items = [items[i] for i in np.random.default_rng(0).permutation(len(items)) if items[i]["prompt"] not in held_out]
    return items[:3000] if split == "sft" else items[3000:]


def _text_prompts(text: str, split: str, prompt_chars: int, target_chars: int) -> list[dict]:
    """Lines of at least ``prompt_chars`` characters; the first 90% of the text is train, the rest validation."""
    cut = int(len(text) * 0.9)
    part = text[:cut] if split != "test" else text[cut:]
    items, start = [], 0
    for line in part.split("\n"):
        if len(line) >= prompt_chars and not line.endswith(":"):  # skip speaker names ("KING RICHARD III:")
            offset = part.find(line, start)
            items.append({"prompt": line[:prompt_chars],
                          "target": part[offset + prompt_chars: offset + prompt_chars + target_chars]})
            start = offset
    return items


def load_prompts(name: str, split: str = "prompts", prompt_chars: int = 24, target_chars: int = 48,
                 max_operand: int = 1000) -> list[dict]:
    """Prompt/target pairs of one split: ``sft`` (labelled), ``prompts`` (for sampling) or ``test``."""
    if split not in ARITHMETIC_SPLITS:
        raise ValueError(f"split must be one of {ARITHMETIC_SPLITS}, got {split!r}")
    if name == "gsm8k_arithmetic":
        return _arithmetic(split, max_operand)
    if name == "two_digit_arithmetic":
        return _two_digit(split)
    if name == "gsm8k":
        rows = _gsm8k("test" if split == "test" else "train")
        return [{"prompt": f"Question: {r['question']}\nAnswer:", "target": r["answer"].split("####")[-1].strip()}
                for r in rows]
    if name.endswith(".txt"):
        path = Path(name) if Path(name).is_absolute() else data_root() / name
        if not path.exists():
            raise MissingDatasetError(f"prompt file not found: {path.resolve()}\n  one document per line; for the "
                                      f"paper's IMDB setting export the 'text' column of the IMDB train split there")
        return _text_prompts(path.read_text(), split, prompt_chars, target_chars)
    return _text_prompts(load_corpus(name), split, prompt_chars, target_chars)
