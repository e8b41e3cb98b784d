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


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> targets [B, T]: position t is scored against labels[t + 1], the last against
    nothing. The labels are shifted, not the logits: slicing [B, T, V] would copy it, and its
    gradient, once more per micro-batch."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of cross-entropy of logits [..., V] against targets [...] (IGNORE_INDEX skipped), and
    the number of supervised targets. The logits are either every position's or only those of the
    supervised targets (see TorchStrategy._summed_loss); the sum is the same."""
    flat_logits = logits.reshape(-1, logits.size(-1)).float()
    loss = F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())
