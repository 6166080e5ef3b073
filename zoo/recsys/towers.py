"""Two-tower building blocks: embedded categorical features and a tower (MLP) over their concatenation.

A feature's values are embedded and averaged (a multi-valued feature is a bag: padding code 0 is left out, an empty
bag embeds to zero). A maskable embedding also learns one *default embedding* per feature, which stands in for the
feature wherever a mask hides it (the input-layer masking of Yao et al., 2021, Sec. 3.2).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["FeatureEmbedding", "Tower"]


class FeatureEmbedding(nn.Module):
    """``{feature: (B, width) codes}`` -> ``(B, num_features, dim)``, features in ``vocabulary`` order.

    Args:
        vocabulary: feature name -> table size (codes 0..size-1, 0 = padding), e.g. a data module's ``schema[side]``.
        dim: embedding width of every feature.
        maskable: learn a default embedding per feature for masked features (``forward(..., keep=...)``).
    """

    def __init__(self, vocabulary: dict[str, int], dim: int, maskable: bool = False):
        super().__init__()
        self.names = list(vocabulary)
        self.tables = nn.ModuleDict({name: nn.EmbeddingBag(size, dim, mode="mean", padding_idx=0)
                                     for name, size in vocabulary.items()})
        self.default = nn.Parameter(torch.randn(len(self.names), dim) * 0.01) if maskable else None

    def forward(self, features: dict[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: (B, num_features) bool, False where a feature is masked (replaced by its default embedding)."""
        embedded = torch.stack([self.tables[name](features[name]) for name in self.names], 1)
        if keep is None:
            return embedded
        return torch.where(keep[..., None], embedded, self.default.to(embedded.dtype))


class Tower(nn.Module):
    """Embedded features -> concatenation -> MLP (ReLU between layers) -> ``out_dim``; not normalised (the loss
    decides)."""

    def __init__(self, embedding: FeatureEmbedding, dim: int, hidden: tuple[int, ...], out_dim: int):
        super().__init__()
        self.embedding = embedding
        widths = [len(embedding.names) * dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(widths[-1], out_dim))

    def forward(self, features: dict[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.embedding(features, keep).flatten(1))
