"""Pack samples into rows of at most `sequence_length` tokens, and build a row's tensors.

A packed row keeps its samples apart: position_ids restart at 0 for each sample (the model runs
with `use_cache=False` and no attention mask, which isolates them on eager/sdpa), and the first
token of every sample is never a target, so no prediction crosses a boundary::

    samples      A = [a0 a1 a2]        B = [b0 b1]
    input_ids    a0 a1 a2 b0 b1
    position_ids 0  1  2  0  1
    labels       -  a1 a2 -  b1        (- = IGNORE_INDEX; labels also mask prompts)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from sft_core.data import IGNORE_INDEX
from sft_core.data.store import EncodedData


@dataclass
class PackedPlan:
    """Which samples make up each row. Rows are in a fixed order; training shuffles row order per epoch."""

    rows: list[list[int]]
    sequence_length: int

    def row_lengths(self, data: EncodedData) -> np.ndarray:
        lengths = data.lengths()
        return np.array([int(lengths[r].sum()) for r in self.rows], dtype=np.int64)

    def padding_fraction(self, data: EncodedData) -> float:
        """Share of a sequence_length-wide grid that would be padding."""
        total = len(self.rows) * self.sequence_length
        return 1.0 - float(self.row_lengths(data).sum()) / total if total else 0.0

    def to_dict(self) -> dict:
        return {"rows": self.rows, "sequence_length": self.sequence_length}

    @classmethod
    def from_dict(cls, d: dict) -> PackedPlan:
        return cls([list(r) for r in d["rows"]], int(d["sequence_length"]))


def pack_best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing; deterministic (ties broken by sample index).

    >>> pack_best_fit_decreasing(np.array([5, 3, 4, 2]), capacity=7)
    [[0, 3], [2, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    # (remaining capacity, bin id) kept sorted: the best fit is the first bin with room enough.
    free: list[tuple[int, int]] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the row capacity {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
    return bins


def plan_rows(data: EncodedData, sequence_length: int, packing: bool) -> PackedPlan:
    if not packing:
        return PackedPlan([[i] for i in range(len(data))], sequence_length)
    return PackedPlan(pack_best_fit_decreasing(data.lengths(), sequence_length), sequence_length)


def build_row(data: EncodedData, sample_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, labels, position_ids) of one packed row, as in the module docstring."""
    ids, labels, positions = [], [], []
    for s in sample_ids:
        x, y = data.sample(s)
        y = y.copy()
        y[0] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
        positions.append(np.arange(len(x), dtype=np.int64))
    return np.concatenate(ids), np.concatenate(labels), np.concatenate(positions)


def supervised_targets(labels: np.ndarray) -> int:
    """Tokens that are a target after the causal shift (labels[1:] not ignored)."""
    return int((labels[1:] != IGNORE_INDEX).sum())
