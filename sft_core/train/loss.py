"""Token-level loss: summed over supervised targets, divided by the global count of the step.

Per micro-batch m on rank r the worker back-propagates `sum_tokens(CE_m) / N` where N is the number
of supervised targets in the whole global batch (all micro-batches, all ranks). Summed over every
micro-batch and rank this is exactly the mean loss per supervised token of the step, so gradient
accumulation and worker count do not change it (a mean of micro-batch means would weight short
answers more).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sft_core.data import IGNORE_INDEX


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> targets [B, T]: position t is scored against labels[t + 1], the last against
    nothing. The labels are shifted, not the logits: slicing [B, T, V] would copy it, and its
    gradient, once more per micro-batch."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy of logits [..., V] (in fp32) against targets [...], IGNORE_INDEX skipped."""
    flat_logits = logits.reshape(-1, logits.size(-1)).float()
    return F.cross_entropy(flat_logits, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


def summed_token_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = token_loss_sum,
) -> tuple[torch.Tensor, int]:
    """token_loss_sum (or a compiled copy of it), and the number of supervised targets. The logits
    are either every position's or only those of the supervised targets (see
    TorchStrategy._summed_loss); the sum is the same."""
    return loss_sum(logits, targets), int((targets != IGNORE_INDEX).sum())
