"""Validation subflow: run every eval_steps (and at step 0 unless eval_at_start is false)."""

from __future__ import annotations

from prefect import flow, get_run_logger

from sft_core.cluster.cluster import Cluster
from sft_core.tracking import Trackers
from sft_core.train import metrics as m
from tasks.train import val_step


@flow(name="validate", flow_run_name="validate-step-{step}")
def validate(cluster: Cluster, step: int, trackers: Trackers) -> dict[str, float]:
    import time

    t = time.perf_counter()
    metrics = val_step(cluster)
    metrics[m.TIME_VAL] = time.perf_counter() - t
    trackers.log_metrics(metrics, step)
    get_run_logger().info("step %d  val_loss %.4f  (%.1fs)", step, metrics[m.VAL_LOSS], metrics[m.TIME_VAL])
    return metrics
