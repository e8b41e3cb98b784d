"""Build micro-batch tensors from packed rows: right-padded, labels ignored on padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sft_core.data import IGNORE_INDEX
from sft_core.data.packing import PackedPlan, build_row
from sft_core.data.store import EncodedData


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE_INDEX on prompts, boundaries and padding
    position_ids: torch.Tensor  # [B, T] long, restarting per packed sample
    real_tokens: int  # tokens that are not padding

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(
            self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device), self.real_tokens
        )


def collate_rows(
    data: EncodedData, plan: PackedPlan, row_ids: list[int], pad_id: int, multiple: int = 8
) -> MicroBatch:
    """Right-pad the rows to the longest one (rounded up to `multiple`).

    Right padding needs no attention mask under causal attention: real tokens never look ahead at
    the padding, and padded positions are never targets.
    """
    rows = [build_row(data, plan.rows[r]) for r in row_ids]
    width = max(len(ids) for ids, _, _ in rows)
    width = min(plan.sequence_length, -(-width // multiple) * multiple) if multiple > 1 else width
    width = max(width, max(len(ids) for ids, _, _ in rows))
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    real = 0
    for b, (ids, lab, pos) in enumerate(rows):
        n = len(ids)
        input_ids[b, :n], labels[b, :n], positions[b, :n] = ids, lab, pos
        positions[b, n:] = np.arange(width - n)  # padding: any valid position, never a target
        real += n
    return MicroBatch(
        torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(positions), real
    )


def masked_batch() -> MicroBatch:
    """A fully masked 2-token micro-batch. A rank with fewer rows than rank 0 in a short last batch
    runs these so every rank makes the same collective calls; they add zero loss and zero gradient."""
    ids = torch.zeros((1, 2), dtype=torch.long)
    return MicroBatch(ids, torch.full_like(ids, IGNORE_INDEX), torch.arange(2).unsqueeze(0), 0)
