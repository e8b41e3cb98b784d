"""The metric names every run logs (MLflow, TensorBoard, registered versions), in one place, and
the per-rank step and validation results turned into them."""

from __future__ import annotations

from sft_core.train.stats import EvalSums, RankStep

LOSS = "sft_train/loss"
GRAD_NORM = "sft_train/grad_norm"
LR = "sft_train/lr"
TOKENS_PER_SEC = "sft_train/tokens_per_sec"
SUPERVISED_TOKENS_PER_SEC = "sft_train/supervised_tokens_per_sec"
SUPERVISED_TOKENS = "sft_train/supervised_tokens"
MFU = "sft_train/mfu"
PAD_RATIO = "sft_train/pad_ratio"
SKIPPED_STEPS = "sft_train/skipped_steps"
EPOCH = "sft_train/epoch"
VAL_LOSS = "sft_train/val_loss"
VAL_SUPERVISED_TOKENS = "sft_train/val_supervised_tokens"
TIME_STEP = "time/step_train"
TIME_DATA = "time/data"
TIME_FWD_BWD = "time/fwd_bwd"
TIME_OPTIMIZER = "time/optimizer"
TIME_COMM = "time/comm"
TIME_VAL = "time/val"
TIME_CHECKPOINT = "time/checkpoint"
# The training metrics a registered version and the run's history keep (short name: the part after '/').
SUMMARY_PREFIX = "sft_train/"
# The short names a registered version is tagged with at every checkpoint, and validation's, there
# where the run validates: the only names metric_for_best_model can match.
TRAIN_SUMMARY = tuple(
    name.removeprefix(SUMMARY_PREFIX)
    for name in (LOSS, GRAD_NORM, LR, TOKENS_PER_SEC, SUPERVISED_TOKENS_PER_SEC, SUPERVISED_TOKENS, MFU,
                 PAD_RATIO, SKIPPED_STEPS, EPOCH)
)  # fmt: skip
VAL_SUMMARY = tuple(name.removeprefix(SUMMARY_PREFIX) for name in (VAL_LOSS, VAL_SUPERVISED_TOKENS))


def peak_memory(rank: int) -> str:
    return f"memory/peak_mb_rank{rank}"


def data_metric(split: str, what: str) -> str:
    """Data accounting: training's keep their short names (data/truncated), other splits are
    prefixed (data/validation_truncated); sample counts always carry the split."""
    return f"data/{what}" if split == "train" and what != "samples" else f"data/{split}_{what}"


def train_metrics(results: list[RankStep]) -> dict[str, float]:
    """Aggregate one step over ranks: each rank's loss_sum is already divided by the global target
    count in its gradient, so the step loss is sum(loss_sum) / num_targets."""
    from sft_core.train.mfu import mfu  # imports torch: here, so that the config can read the names

    first = results[0]
    num_targets = first.num_targets
    step_time = max(r.time_step for r in results)
    tokens = sum(r.tokens for r in results)
    real = sum(r.real_tokens for r in results)
    comm = [r.stats.time_comm for r in results if r.stats.time_comm is not None]
    return {
        **({TIME_COMM: max(comm)} if comm else {}),
        LOSS: sum(r.stats.loss_sum for r in results) / max(num_targets, 1),
        GRAD_NORM: first.stats.grad_norm,
        LR: first.stats.lr,
        TOKENS_PER_SEC: real / step_time,
        SUPERVISED_TOKENS_PER_SEC: num_targets / step_time,
        SUPERVISED_TOKENS: float(num_targets),
        PAD_RATIO: 1.0 - real / tokens if tokens else 0.0,
        # Every worker's FLOPs over every worker's peak for the step: tensor/pipeline-parallel
        # ranks hold no tokens of their own but their peak still counts.
        MFU: mfu(sum(r.flops for r in results), step_time, sum(r.peak_flops for r in results)),
        SKIPPED_STEPS: float(first.stats.skipped_steps),
        EPOCH: float(first.epoch),
        TIME_STEP: step_time,
        TIME_DATA: max(r.time_data for r in results),
        TIME_FWD_BWD: max(r.stats.time_fwd_bwd for r in results),
        TIME_OPTIMIZER: max(r.stats.time_optimizer for r in results),
        **{peak_memory(r.rank): r.peak_memory_mb for r in results},
    }


def val_metrics(results: list[EvalSums]) -> dict[str, float]:
    """Token-weighted validation loss over every rank's share (not a mean of batch means)."""
    targets = sum(r.targets for r in results)
    return {
        VAL_LOSS: sum(r.loss_sum for r in results) / max(targets, 1),
        VAL_SUPERVISED_TOKENS: float(targets),
    }
