"""Token-level loss: summed over supervised targets, divided by the global count of the step.

Per micro-batch m on rank r the worker back-propagates `sum_tokens(CE_m) / N` where N is the number
of supervised targets in the whole global batch (all micro-batches, all ranks). Summed over every
micro-batch and rank this is exactly the mean loss per supervised token of the step, so gradient
accumulation and worker count do not change it (a mean of micro-batch means would weight short
answers more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sft_core.data import IGNORE_INDEX


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over supervised targets, and their count.

    logits [B, T, V] predict labels shifted by one: position t is scored against labels[t + 1].
    The labels are shifted (the last position gets no target), not the logits: slicing [B, T, V]
    would copy it, and its gradient, once more per micro-batch.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    flat_logits = logits.reshape(-1, logits.size(-1)).float()
    loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())
