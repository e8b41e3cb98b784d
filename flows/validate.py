"""Validation subflow: run every eval_steps (and at step 0 unless eval_at_start is false)."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from flows.runtime import lost_prefect_api
from sft_core.cluster.cluster import Cluster
from sft_core.tracking import Trackers
from sft_core.train import metrics as m
from tasks.train import val_step

# How long a validation waits for a Prefect server that does not answer: as long as Prefect's client
# retries a request of the parent flow's (PREFECT_CLIENT_MAX_RETRIES=5, backoff: about a minute).
_WAIT_FOR_SERVER_S = 60.0
_RETRY_EVERY_S = 2.0
# The steps whose validation body began in this process (the subflow runs inline).
_begun: set[int] = set()


@flow(name="validate", flow_run_name="validate-step-{step}")
def validate(cluster: Cluster, step: int, trackers: Trackers) -> dict[str, float]:
    _begun.add(step)
    t = time.perf_counter()
    metrics = val_step(cluster)
    metrics[m.TIME_VAL] = time.perf_counter() - t
    trackers.log_metrics(metrics, step)
    get_run_logger().info("step %d  val_loss %.4f  (%.1fs)", step, metrics[m.VAL_LOSS], metrics[m.TIME_VAL])
    return metrics


def run_validation(cluster: Cluster, step: int, trackers: Trackers) -> dict[str, float]:
    """The validate subflow, without a heartbeat thread of its own. Prefect's heartbeat thread sleeps
    in whole seconds and is joined when its flow run ends, so a subflow of a fraction of a second
    cost up to a second more (0.8 s on average in the smoke run: 2.4 of its 22 s of overhead). The
    subflow runs inline in the parent's process, whose own heartbeats go on meanwhile.

    A Prefect server that does not answer when the subflow starts is waited for, as Prefect's client
    waits for it in the parent's own calls: the subflow's engine opens a client of its own, which
    Prefect does not retry before its first connection, so a server restarted for a few seconds
    failed the run whenever a validation began meanwhile."""
    deadline = time.monotonic() + _WAIT_FOR_SERVER_S
    while True:
        try:
            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                return validate(cluster, step, trackers)
        except Exception as err:
            # Only a subflow that never began: one that ran may have logged its metrics already.
            if step in _begun or lost_prefect_api(err) is None or time.monotonic() > deadline:
                raise
            get_run_logger().warning(
                "validation at step %d: the Prefect server does not answer (%s); trying again in %gs",
                step, type(err).__name__, _RETRY_EVERY_S,
            )  # fmt: skip
            time.sleep(_RETRY_EVERY_S)
