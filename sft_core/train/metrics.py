"""Turn per-rank results into the metric names of DESIGN.md."""

from __future__ import annotations

from typing import Any

from sft_core.train.mfu import mfu


def train_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregate one step over ranks: each rank's loss_sum is already divided by the global target
    count in its gradient, so the step loss is sum(loss_sum) / num_targets."""
    num_targets = results[0]["num_targets"]
    step_time = max(r["time_step"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    real = sum(r["real_tokens"] for r in results)
    comm = [r["time_comm"] for r in results if r.get("time_comm") is not None]
    return {
        **({"time/comm": max(comm)} if comm else {}),
        "sft_train/loss": sum(r["loss_sum"] for r in results) / max(num_targets, 1),
        "sft_train/grad_norm": results[0]["grad_norm"],
        "sft_train/lr": results[0]["lr"],
        "sft_train/tokens_per_sec": real / step_time,
        "sft_train/supervised_tokens_per_sec": num_targets / step_time,
        "sft_train/supervised_tokens": float(num_targets),
        "sft_train/pad_ratio": 1.0 - real / tokens if tokens else 0.0,
        # Every worker's FLOPs over every worker's peak for the step: tensor/pipeline-parallel
        # ranks hold no tokens of their own but their peak still counts.
        "sft_train/mfu": mfu(
            sum(r["flops"] for r in results), step_time, sum(r["peak_flops"] for r in results)
        ),
        "sft_train/skipped_steps": float(results[0]["skipped_steps"]),
        "sft_train/epoch": float(results[0]["epoch"]),
        "time/step_train": step_time,
        "time/data": max(r["time_data"] for r in results),
        "time/fwd_bwd": max(r["time_fwd_bwd"] for r in results),
        "time/optimizer": max(r["time_optimizer"] for r in results),
        **{f"memory/peak_mb_rank{r['rank']}": r["peak_memory_mb"] for r in results},
    }


def val_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """Token-weighted validation loss over every rank's share (not a mean of batch means)."""
    targets = sum(r["targets"] for r in results)
    return {
        "sft_train/val_loss": sum(r["loss_sum"] for r in results) / max(targets, 1),
        "sft_train/val_supervised_tokens": float(targets),
    }
