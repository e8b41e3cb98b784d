"""The training actors, launched in the background as soon as Ray is up.

An actor's process start and imports take seconds (torch, transformers, the strategy). Launched at
the top of the flow, they overlap the data stages and the MLflow set-up instead of following them;
`start-cluster` then only hands the actors the run's files and loads the model.
"""

from __future__ import annotations

import contextvars
import threading

from flows.ray_runner import wait_for_ray
from sft_core.cluster.cluster import Cluster
from sft_core.config import SFTConfig


class ClusterLaunch:
    def __init__(self, cfg: SFTConfig):
        self._cluster: Cluster | None = None
        self._error: BaseException | None = None
        # The flow run's context goes with it: wait_for_ray finds the run's task runner there.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._launch, cfg), name="cluster-launch", daemon=True
        )
        self._thread.start()

    def _launch(self, cfg: SFTConfig) -> None:
        try:
            wait_for_ray()
            self._cluster = Cluster(cfg)
        except BaseException as err:  # raised again in take()
            self._error = err

    def take(self) -> Cluster:
        """The launched cluster, once; raises what the launch raised."""
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        cluster, self._cluster = self._cluster, None
        if cluster is None:
            raise RuntimeError("the launched cluster was taken already")
        return cluster

    def discard(self, wait: bool = True) -> None:
        """Shut the actors down if nobody took them (the flow failed or was stopped before training;
        `wait` as for Cluster.shutdown)."""
        self._thread.join()
        if self._cluster is not None:
            self._cluster.shutdown(wait=wait)
            self._cluster = None
