"""Seeded random train/valid/test assignment that depends only on a row's number and
the seed: streaming-friendly (no state across chunks), the same in both passes, and
independent of how the input is chunked."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model_zoo.data.layout import SPLITS

DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if fractions[0] == 0:
        raise ValueError("the training split cannot be empty: the vocabulary comes from it")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SplitAssigner:
    def __init__(self, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> None:
        self.fractions = check_fractions(fractions)
        self.seed = seed
        self._seed_key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
        self._bounds = np.cumsum(self.fractions)[:-1]

    def assign(self, row_ids: np.ndarray) -> np.ndarray:
        """Split number (0 train, 1 valid, 2 test) per row, as int8."""
        with np.errstate(over="ignore"):
            hashed = _splitmix64(np.asarray(row_ids, dtype=np.uint64) ^ self._seed_key)
        uniform = (hashed >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return np.searchsorted(self._bounds, uniform, side="right").astype(np.int8)
