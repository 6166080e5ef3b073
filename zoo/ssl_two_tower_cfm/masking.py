"""The paper's item augmentations (Yao et al., 2021, Sec. 3.2 and 3.3): complementary feature masks, chosen at random
(RFM) or by feature correlation (CFM), and dropout of the values of multi-valued features.

- Complementary masking: view 1 masks a set of features, view 2 masks exactly the complement, so every feature is
  seen by one view and hidden from the other and the two views share no input feature.
- RFM: the masked set of view 1 is a uniformly random half (``k // 2``) of the ``k`` features.
- CFM: a seed feature is drawn uniformly, and masked together with its ``k // 2 - 1`` most correlated features, by
  the mutual information between feature pairs pre-computed once on the item corpus, so that correlated features
  land in the same view and one view cannot read the other's features off their correlates.
- Dropout: each value of a multi-valued feature is dropped (set to the padding code) with probability ``p``,
  independently per view.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["feature_mutual_information", "correlated_groups", "correlated_masks", "random_masks", "drop_values"]


def _values(codes: np.ndarray) -> list[np.ndarray]:
    """Each row's set of values; a row of padding only has the single value 0 ("unknown")."""
    return [np.unique(row[row > 0]) if (row > 0).any() else np.zeros(1, np.int64) for row in codes]


def _mutual_information(joint: sp.csr_matrix) -> float:
    """MI (nats) of a joint distribution given by non-negative (fractional) counts. scikit-learn's
    ``mutual_info_score`` would be the library call, but it casts a contingency table to integers."""
    joint = joint / joint.sum()
    rows, cols, p = sp.find(joint)
    marginal_rows, marginal_cols = np.asarray(joint.sum(1)).ravel(), np.asarray(joint.sum(0)).ravel()
    return float((p * np.log(p / (marginal_rows[rows] * marginal_cols[cols]))).sum())


def feature_mutual_information(table: dict[str, np.ndarray]) -> np.ndarray:
    """(k, k) mutual information (nats) between every pair of features of ``table`` (name -> (N, width) codes).

    For single-valued features it is the MI of the two columns. A multi-valued row (a set of values) spreads its
    unit weight evenly over the pairs of its values, so the joint is a distribution over value pairs; the paper
    names MI between categorical features without saying how sets are counted, so this is our rule. The diagonal is
    each feature's entropy."""
    names = list(table)
    rows = {name: _values(table[name]) for name in names}
    sizes = {name: int(table[name].max()) + 1 for name in names}
    mi = np.zeros((len(names), len(names)))
    for a, name_a in enumerate(names):
        for b, name_b in enumerate(names[a:], start=a):
            i, j, w = [], [], []
            for va, vb in zip(rows[name_a], rows[name_b]):
                pairs_a, pairs_b = np.meshgrid(va, vb, indexing="ij")
                i.append(pairs_a.ravel()), j.append(pairs_b.ravel())
                w.append(np.full(pairs_a.size, 1.0 / pairs_a.size))
            contingency = sp.coo_matrix((np.concatenate(w), (np.concatenate(i), np.concatenate(j))),
                                        shape=(sizes[name_a], sizes[name_b])).tocsr()
            mi[a, b] = mi[b, a] = _mutual_information(contingency)
    return mi


def correlated_groups(mutual_information: np.ndarray) -> torch.Tensor:
    """(k, k // 2) long: row s = seed feature s followed by its ``k // 2 - 1`` most correlated other features (by
    MI, ties to the lower index), the features CFM masks in view 1 when s is the seed."""
    k = len(mutual_information)
    groups = []
    for seed in range(k):
        others = [f for f in np.argsort(-mutual_information[seed], kind="stable") if f != seed]
        groups.append([seed, *others[: k // 2 - 1]])
    return torch.tensor(np.array(groups, np.int64).reshape(k, k // 2))


def correlated_masks(groups: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, k) bool *keep* mask of view 1 under CFM (view 2 keeps ``~mask``): a uniform seed per example, and its
    group hidden."""
    k = groups.shape[0]
    seeds = torch.randint(0, k, (batch,), generator=generator, device=groups.device)
    keep = torch.ones(batch, k, dtype=torch.bool, device=groups.device)
    return keep.scatter(1, groups[seeds], False)


def random_masks(k: int, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, k) bool *keep* mask of view 1 under RFM: a uniformly random ``k // 2`` features hidden per example."""
    order = torch.rand(batch, k, generator=generator, device=device).argsort(1)
    keep = torch.ones(batch, k, dtype=torch.bool, device=device)
    return keep.scatter(1, order[:, : k // 2], False)


def drop_values(features: dict[str, torch.Tensor], multi_valued: tuple[str, ...], p: float,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """``features`` with each value of every multi-valued feature set to padding (0) with probability ``p``."""
    out = dict(features)
    for name in multi_valued:
        codes = features[name]
        dropped = torch.rand(codes.shape, generator=generator, device=codes.device) < p
        out[name] = codes.masked_fill(dropped, 0)
    return out
