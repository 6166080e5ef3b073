"""Offline real text sets (``ZOO_DATA_DIR`` or ``../shared/data``) and a padding collator for tokenized text.

- ``hh_rlhf``: Anthropic HH-RLHF harmless-base test split, 2,312 human preference pairs (chosen, rejected dialogues
  that share everything up to the last ``"\\n\\nAssistant:"``).
- ``ag_news``: AG News official test split, 7,600 articles, 4 topics (World, Sports, Business, Sci/Tech).
"""
from __future__ import annotations

import csv
import gzip
import json

from zoo.core.datasets import require_file

__all__ = ["load_hh_rlhf", "split_dialogue", "load_ag_news"]

ASSISTANT = "\n\nAssistant:"


def load_hh_rlhf() -> list[dict]:
    """``[{"chosen": str, "rejected": str}, ...]`` (2,312 pairs)."""
    path = require_file("hh_rlhf/harmless-base-test.jsonl.gz",
                    "HH-RLHF harmless-base test: anthropics/hh-rlhf harmless-base/test.jsonl.gz (MIT).")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def split_dialogue(dialogue: str) -> tuple[str, str]:
    """(prompt up to and including the last ``"\\n\\nAssistant:"``, the final assistant response)."""
    prompt, _, response = dialogue.rpartition(ASSISTANT)
    return prompt + ASSISTANT, response


def load_ag_news() -> tuple[list[str], list[int]]:
    """Texts ``title. description`` and labels 0..3 (World, Sports, Business, Sci/Tech), 1,900 per class."""
    path = require_file("ag_news/test.csv.gz",
                    "AG News official test split (Zhang et al. 2015), csv with label,title,description.")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["title"] + ". " + r["description"] for r in rows], [int(r["label"]) - 1 for r in rows]
