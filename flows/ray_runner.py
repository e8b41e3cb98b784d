"""The flow's Ray task runner: where Ray runs is decided when a flow run starts, not at import.

A deployment run's config arrives as flow-run parameters, but Prefect enters the task runner
before the flow body reads them. So on entry the runner reads the run's parameters itself and
joins the config's `ray_address`; the CLI and a deployment run behave alike, and the worker needs
no RAY_ADDRESS of its own. Without an address, a local Ray starts on loopback only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from prefect_ray import RayTaskRunner

from flows.runtime import set_local_defaults

logger = logging.getLogger(__name__)


def pin_to_loopback() -> dict[str, Any]:
    """Keep this process's Ray on 127.0.0.1; returns the ray.init argument that says so. Ray binds
    its GCS, raylet, object manager, agents and workers to the node IP, which it takes from the route
    to the outside unless told otherwise: a local run would be reachable from the network."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; Ray is imported already
    return {"_node_ip_address": "127.0.0.1"}


def local_init_kwargs() -> dict[str, Any]:
    """A Ray of this run's own, on loopback, without a dashboard."""
    return {
        **pin_to_loopback(),
        "num_cpus": max(2, os.cpu_count() or 2),
        "include_dashboard": False,
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": "warning",
    }


def configured_address() -> str | None:
    """RAY_ADDRESS, else the `ray_address` of this flow run's config (read from its parameters)."""
    if address := os.environ.get("RAY_ADDRESS"):
        return address
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")  # set by the worker for a deployment run
    if not flow_run_id:
        return None
    try:
        from prefect.client.orchestration import get_client

        from sft_core.config_loader import load_config

        with get_client(sync_client=True) as client:
            params = client.read_flow_run(flow_run_id).parameters
        cfg = load_config(
            params.get("config_name", "sft_config"), params.get("overrides") or [], params.get("config_path")
        )
    except Exception as err:  # a bad config is reported by the flow body, with its key named
        logger.warning("could not read the flow run's ray_address (%s); starting a local Ray", err)
        return None
    return cfg.ray_address


class SFTRayTaskRunner(RayTaskRunner):
    def __enter__(self) -> SFTRayTaskRunner:
        # One result cache (encode/pack records) for `sft run` and a worker's runs: the project's
        # default, unless the environment names another. Tasks get the flow's Prefect settings
        # with them, so this reaches the Ray workers too, on a joined cluster as well.
        set_local_defaults()
        results = os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"]
        self._settings = temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: results})
        self._settings.__enter__()
        if not ray.is_initialized():
            address = configured_address()
            if address:
                self.address, self.init_kwargs = address, {"namespace": "prefect"}
                if address.split(":")[0] in ("127.0.0.1", "localhost"):  # a cluster on this machine
                    self.init_kwargs.update(pin_to_loopback())
            else:
                # "local": a Ray of our own, even where `ray start` left a cluster that ray.init()
                # would otherwise join.
                self.address, self.init_kwargs = "local", {"namespace": "prefect", **local_init_kwargs()}
        return super().__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self._settings.__exit__(None, None, None)
