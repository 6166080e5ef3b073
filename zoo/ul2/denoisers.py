"""UL2's denoisers: how one window of tokens becomes an (inputs, targets) example.

- :func:`random_spans_noise_mask`: T5's span-corruption mask. ``round(rate * L)`` noise tokens in
  ``round(noise / mean_span)`` spans; noise and non-noise span lengths are uniform random compositions, and the
  spans alternate, starting with non-noise (so the mask always ends on a noise span).
- :func:`span_corrupt`: each noise span is replaced by one sentinel in the inputs; the targets hold the sentinels
  followed by the spans they replaced (T5's ``noise_span_to_unique_sentinel`` / ``nonnoise_span_to_unique_sentinel``).
- :class:`Denoiser`: one task of the mixture, ``span`` (R or X by its rate and span length), ``prefix`` (S: the
  prefix is the input, the rest the target, the split uniform in [1, L-1]) or ``causal`` (plain language modelling,
  the baseline), each with its mode token. :data:`UL2_DENOISERS` is the paper's mixture of seven.

Follows google-research/text-to-text-transfer-transformer ``t5/data/preprocessors.py`` (``random_spans_noise_mask``,
``random_prefix_noise_mask``, ``noise_span_to_unique_sentinel``) and the ``ul2_objective`` of the paper's appendix
(Tay et al., 2023, section 9.2), which samples the denoisers uniformly unless given rates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Denoiser", "UL2_DENOISERS", "random_spans_noise_mask", "random_prefix_split", "span_corrupt", "denoise"]


@dataclass(frozen=True)
class Denoiser:
    """One denoising task.

    Args:
        kind: ``span`` (span corruption), ``prefix`` (S-denoiser, prefix LM) or ``causal`` (plain next-token LM,
            no split: the whole window is the target; the baseline's task, not one of UL2's).
        mean_span: mean noise-span length mu (``span`` only).
        rate: corruption rate r, the fraction of the window's tokens that are noise (``span`` only).
        mode: the mode token prepended to the inputs (the released checkpoints' ``[NLU]`` / ``[NLG]`` / ``[S2S]``
            for the paper's ``[R]`` / ``[X]`` / ``[S]``); empty for none.
    """

    kind: Literal["span", "prefix", "causal"] = "span"
    mean_span: float = 3.0
    rate: float = 0.15
    mode: str = "[NLU]"

    def __post_init__(self):
        if self.kind not in ("span", "prefix", "causal"):
            raise ValueError(f"Denoiser kind must be span, prefix or causal, got {self.kind!r}")
        if self.kind == "span" and not (0.0 < self.rate < 1.0 and self.mean_span >= 1.0):
            raise ValueError(f"span Denoiser needs 0 < rate < 1 and mean_span >= 1, got rate={self.rate}, "
                             f"mean_span={self.mean_span}")

    @property
    def name(self) -> str:
        """``R_mu3_r0.15``, ``X_mu64_r0.5``, ``S``, ``causal``: X is a span task with mu >= 12 or r >= 30% (paper
        section 3.1.2)."""
        if self.kind != "span":
            return {"prefix": "S", "causal": "causal"}[self.kind]
        paradigm = "X" if self.mean_span >= 12 or self.rate >= 0.3 else "R"
        return f"{paradigm}_mu{self.mean_span:g}_r{self.rate:g}"


# The paper's final mixture (appendix 9.2): R = (3, 15%), (8, 15%); X = (3, 50%), (8, 50%), (64, 15%), (64, 50%); S.
UL2_DENOISERS = (
    Denoiser("span", 3.0, 0.15, "[NLU]"), Denoiser("span", 8.0, 0.15, "[NLU]"),
    Denoiser("span", 3.0, 0.5, "[NLG]"), Denoiser("span", 8.0, 0.5, "[NLG]"),
    Denoiser("span", 64.0, 0.15, "[NLG]"), Denoiser("span", 64.0, 0.5, "[NLG]"),
    Denoiser("prefix", mode="[S2S]"),
)


def _random_segmentation(num_items: int, num_segments: int, rng) -> np.ndarray:
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` non-empty segments: choose which
    ``num_segments - 1`` of the ``num_items - 1`` gaps start a new segment."""
    starts_segment = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(np.concatenate([[False], starts_segment]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float, rng) -> np.ndarray:
    """Boolean mask of ``length``: True = noise. ``rng``: ``np.random.Generator`` or ``RandomState`` (only
    ``permutation`` is called: once for the noise spans, then once for the non-noise spans)."""
    orig_length, length = length, max(length, 2)  # T5 avoids the degenerate length 1 the same way
    num_noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_noise_span_length)), 1)
    num_spans = min(num_spans, length - num_noise)  # every noise span needs a non-noise span before it
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_start = np.zeros(length, dtype=np.int64)
    span_start[np.cumsum(interleaved)[:-1]] = 1
    return (np.cumsum(span_start) % 2 == 1)[:orig_length]


def random_prefix_split(length: int, rng) -> int:
    """Number of prefix (input) tokens of the S-denoiser: uniform in [1, length - 1] (T5's
    ``random_prefix_noise_mask``)."""
    return int(rng.integers(1, max(length - 1, 1) + 1))


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """``tokens`` with the k-th masked span replaced by ``sentinels[k]``."""
    previous = np.concatenate([[False], mask[:-1]])
    first = mask & ~previous
    if first.sum() > len(sentinels):
        raise ValueError(f"{first.sum()} spans but only {len(sentinels)} sentinel tokens")
    span_index = np.maximum(np.cumsum(first) - 1, 0)
    replaced = np.where(first, sentinels[span_index], tokens)
    return replaced[~(mask & previous)]


def span_corrupt(tokens: np.ndarray, noise_mask: np.ndarray, sentinels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets): inputs keep the non-noise tokens with one sentinel per noise span; targets are the noise
    spans, each after the sentinel that replaced it. Since the mask starts with non-noise, sentinel k of the
    targets opens noise span k."""
    return _spans_to_sentinels(tokens, noise_mask, sentinels), _spans_to_sentinels(tokens, ~noise_mask, sentinels)


def denoise(tokens: np.ndarray, denoiser: Denoiser, rng, sentinels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one window under ``denoiser``, without mode token or EOS."""
    if denoiser.kind == "span":
        mask = random_spans_noise_mask(len(tokens), denoiser.rate, denoiser.mean_span, rng)
        return span_corrupt(tokens, mask, sentinels)
    if denoiser.kind == "prefix":
        split = random_prefix_split(len(tokens), rng)
        return tokens[:split], tokens[split:]
    return tokens[:0], tokens
