"""The flow's Ray task runner: where Ray runs is decided when a flow run starts, not at import.

A deployment run's config arrives as flow-run parameters, but Prefect enters the task runner
before the flow body reads them. So on entry the runner reads the run's parameters itself and
joins the config's `ray_address`; the CLI and a deployment run behave alike, and the worker needs
no RAY_ADDRESS of its own. Without an address, a local Ray starts on loopback only.

Ray starts in the background: nothing before the training cluster needs it (the data stages run in
the flow's process), so the flow prepares data and MLflow while Ray's processes come up, and waits
for them only where it needs them (`wait_for_ray`, or a task submitted to Ray). `sft run` begins the
start even earlier, as soon as the Prefect server is known (flows/ray_start.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any

import ray
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect.task_runners import TaskRunner
from prefect_ray import RayTaskRunner

from flows.ray_start import RayStart, configured_address, init_arguments, stop_monitor, take_early_start
from flows.runtime import set_local_defaults


def _ray_sigterm(signum: int, frame: Any) -> None:
    sys.exit(signum)  # as ray.init sets it in the main thread: the exit shuts Ray down (atexit)


class SFTRayTaskRunner(RayTaskRunner):
    _start: RayStart | None = None
    _ray_up = False

    def __enter__(self) -> SFTRayTaskRunner:
        # One result cache (encode/pack records) for `sft run` and a worker's runs: the project's
        # default, unless the environment names another. Tasks get the flow's Prefect settings
        # with them, so this reaches the Ray workers too, on a joined cluster as well.
        set_local_defaults()
        results = os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]
        self._settings = temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: results})
        self._settings.__enter__()
        # Not RayTaskRunner.__enter__, which would wait in ray.init: ours runs in the background.
        TaskRunner.__enter__(self)
        self._start = take_early_start()
        if self._start is None and not ray.is_initialized():
            self._start = RayStart(*init_arguments(configured_address()))
        self._owns_ray = self._start is not None
        if self._start is None:  # a Ray this process joined before: used as it is
            self._ray_up = True
            return self
        self.address, self.init_kwargs = self._start.address, self._start.init_kwargs
        # Ray's own SIGTERM handler, which a background ray.init cannot set, only where nobody set
        # one: the Prefect engine's turns the SIGTERM of a worker's cancel into a TerminationSignal
        # that ends the flow run Cancelled (ours, a SystemExit, would have it crash instead).
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL,
            None,
        ):
            signal.signal(signal.SIGTERM, _ray_sigterm)
        where = "a local Ray on 127.0.0.1" if self.address == "local" else f"Ray at {self.address}"
        self.logger.info("Ray: starting %s in the background", where)
        return self

    def wait_for_ray(self) -> None:
        if self._ray_up or self._start is None:
            return
        began = time.perf_counter()
        self._start.wait()
        self._ray_up = True
        nodes = sum(1 for n in ray.nodes() if n.get("alive"))
        self.logger.info(
            "Ray: up in %.1fs (the flow waited %.1fs for it), %d node(s)",
            self._start.seconds, time.perf_counter() - began, nodes,
        )  # fmt: skip

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.wait_for_ray()
        return super().submit(*args, **kwargs)

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self._start is not None:
                with contextlib.suppress(Exception):  # its error, if any, was the flow's to raise
                    self._start.wait()  # a start still under way ends before Ray is shut down
                # A failed start left nothing to shut down (and the base class's check of the
                # runtime context would start a Ray of its own).
                self._owns_ray = ray.is_initialized()
                if self._owns_ray and self.address == "local":
                    stop_monitor()
            super().__exit__(*exc_info)
        finally:
            if self._start is not None:
                self._start.release()
            self._settings.__exit__(None, None, None)


def wait_for_ray() -> None:
    """Block until this flow run's Ray is up (the task runner starts it in the background)."""
    ctx = FlowRunContext.get()
    runner = ctx.task_runner if ctx else None
    if isinstance(runner, SFTRayTaskRunner):
        runner.wait_for_ray()
    if not ray.is_initialized():
        raise RuntimeError("no Ray runtime: the flow's task runner did not start one")
