"""ConvexDA's two ingredients: a spelling-noise augmenter and the convex-hull selection of augmented copies.

The paper augments with nlpaug's ``SpellingAug`` (a dictionary of common misspellings, at most 5% of the words);
:func:`spelling_noise` is a dependency-free stand-in that misspells the same share of words with character edits
(swap, drop, double or replace a letter). :func:`convex_hull_selection` follows ``code/DA_convex.py``: PCA to 2-D of the
copies' sentence embeddings, then the vertices of their convex hull (scipy's Qhull, counter-clockwise order).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull, QhullError
from sklearn.decomposition import PCA

__all__ = ["spelling_noise", "convex_hull_selection"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _misspell(word: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(0, len(word) - 1))
    edit = rng.integers(0, 4)
    if edit == 0:  # swap two neighbouring letters
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if edit == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    if edit == 2:  # double a letter
        return word[:i] + word[i] + word[i:]
    return word[:i] + _LETTERS[int(rng.integers(0, 26))] + word[i + 1:]


def spelling_noise(text: str, rng: np.random.Generator, fraction: float = 0.05) -> str:
    """Misspells ``max(1, round(fraction * #words))`` of the alphabetic words with at least 3 letters."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 3 and w.isalpha()]
    if not candidates:
        return text
    count = min(len(candidates), max(1, round(fraction * len(words))))
    for i in rng.choice(candidates, size=count, replace=False):
        words[i] = _misspell(words[i], rng)
    return " ".join(words)


def convex_hull_selection(embeddings: np.ndarray) -> list[int]:
    """Indices of the copies on the convex hull of their 2-D PCA projection, in Qhull's vertex order.

    With fewer than 3 distinct points, or all of them on a line (no 2-D hull), every copy is kept: the official code
    has no guard there and raises."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if len(embeddings) < 3:
        return list(range(len(embeddings)))
    projected = PCA(n_components=2).fit_transform(embeddings)
    try:
        return [int(v) for v in ConvexHull(projected).vertices]
    except QhullError:
        return list(range(len(embeddings)))
