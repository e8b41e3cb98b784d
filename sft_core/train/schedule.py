"""Learning-rate schedule: linear warmup, then linear / cosine decay to min_lr_ratio, or constant."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at 0-based optimizer step `step`.

    >>> [round(lr_factor(s, 10, 2, "linear", 0.0), 2) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    shape = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    warmup_ratio: float,
    kind: str,
    min_ratio: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps or math.ceil(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, kind, min_ratio)
    )


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After loading a saved scheduler: set each parameter group's lr to what *this* schedule gives
    at the saved step. The optimizer's saved lr is the old schedule's, wrong for the first resumed
    step when the run's length changed (a cosine that had reached 0 stays 0); with the schedule
    unchanged it is the same number, bit for bit (computed the same way)."""
    step = scheduler.last_epoch
    lrs = [base * fn(step) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
