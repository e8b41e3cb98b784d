"""The global batch sequence, and how one step is split over ranks and micro-batches.

The sequence of global batches depends only on (seed, number of rows, global batch size): each epoch
is a seeded permutation of the packed rows cut into global batches (the last one may be short; no
row is dropped). Each rank takes rows `r, r+W, r+2W, ...` of a batch and cuts them into micro-batches
of `per_device_train_batch_size`. Because the loss is normalized by the supervised-token count of
the whole global batch, how it is split does not change the gradient::

    global batch (G=8 rows)  r0 r1 r2 r3 r4 r5 r6 r7
    W=2, micro=2             rank0: [r0 r2] [r4 r6]   rank1: [r1 r3] [r5 r7]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchSchedule:
    num_rows: int
    global_batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_rows / self.global_batch_size)

    def total_steps(self, num_train_epochs: float, max_steps: int) -> int:
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(num_train_epochs * self.steps_per_epoch))

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def global_batch(self, step: int) -> list[int]:
        """Row ids of 0-based optimizer step `step` (epochs repeat with a new permutation)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return [int(r) for r in order[i * self.global_batch_size : (i + 1) * self.global_batch_size]]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch


def split_for_rank(rows: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch (possibly none for a short last batch)."""
    mine = rows[rank::world_size]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
