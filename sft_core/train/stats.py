"""What one step reports, typed: a strategy's step, a rank's step, a rank's validation sums.

Strategies fill `StepStats`; the worker wraps it in `RankStep` with what only it knows (tokens,
timings around the strategy, FLOPs); metrics.py turns a list of `RankStep`, one per rank, into the
metric names runs log. Plain frozen dataclasses: they cross Ray by pickling.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepStats:
    """One optimizer step as a strategy sees it on one rank."""

    loss_sum: float  # summed token loss of this rank's micro-batches (0 where the rank reports none)
    targets: int  # supervised targets in them
    grad_norm: float  # of the whole model's gradient, accumulated in float64
    lr: float  # the learning rate this step used
    skipped_steps: int  # non-finite steps so far, never applied to the weights
    time_fwd_bwd: float
    time_optimizer: float
    time_comm: float | None = None  # gradient collectives in flight; None where not measurable


@dataclass(frozen=True)
class RankStep:
    """One optimizer step on one rank: the strategy's stats plus the worker's accounting."""

    rank: int
    stats: StepStats
    num_targets: int  # supervised targets of the whole global batch (the loss divisor)
    tokens: int  # tokens in this rank's rows incl. padding (0 on ranks that do not report)
    real_tokens: int  # tokens that are not padding
    flops: float  # model FLOPs of this rank's tokens (forward + backward, attention included)
    peak_flops: float  # this rank's device peak, the MFU denominator
    time_data: float  # building this rank's micro-batches
    time_step: float  # the whole step on this rank
    epoch: int
    peak_memory_mb: float


@dataclass(frozen=True)
class EvalSums:
    """Validation over one rank's share: summed token loss and the supervised targets behind it."""

    loss_sum: float = 0.0
    targets: int = 0
