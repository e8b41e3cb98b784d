"""Starting Ray for a flow run: a local Ray of the run's own on loopback, or a configured cluster,
brought up by `ray.init` in a thread of its own (`RayStart`) so that the caller goes on meanwhile.

This module imports Ray and nothing of Prefect's: `sft run` begins the start as soon as the Prefect
server is known (`begin_local_start`), before the 2 s of importing Prefect and the flow, and Ray's
processes come up on the core that the command's imports leave idle. flows/ray_runner.py's task
runner takes the start over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from flows.runtime import set_local_defaults
from sft_core.errors import ConfigError
from sft_core.home import private_tmp

logger = logging.getLogger(__name__)


def pin_to_loopback() -> dict[str, Any]:
    """Keep this process's Ray on 127.0.0.1; returns the ray.init argument that says so. Ray binds
    its GCS, raylet, object manager, agents and workers to the node IP, which it takes from the route
    to the outside unless told otherwise: a local run would be reachable from the network."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; Ray is imported already
    return {"_node_ip_address": "127.0.0.1"}


def local_init_kwargs() -> dict[str, Any]:
    """A Ray of this run's own, on loopback, in a session folder of this user's, without a dashboard,
    and without idle workers started ahead: the flow submits nothing to Ray before its actors, and
    those (with a runtime_env of their own) cannot use them, so they would only take CPU while the
    run starts."""
    return {
        **pin_to_loopback(),
        # Ray makes its folders open to all (0777) and its logs readable by all, the runtime_env
        # agent's with the workers' environment variables in plain text: inside a folder of this
        # user's alone instead of the machine's shared /tmp/ray.
        "_temp_dir": str(private_tmp() / "ray"),
        "num_cpus": max(2, os.cpu_count() or 2),
        "include_dashboard": False,
        "log_to_driver": True,
        "configure_logging": True,
        "logging_level": "warning",
        "_system_config": {"prestart_worker_first_driver": False, "enable_worker_prestart": False},
    }


def own_token() -> None:
    """Token authentication with a token of this run's own, for the local Ray it starts. Without one,
    any process of the machine (any user's) that finds the GCS port on loopback can run code in the
    run's workers, through the GCS or the dashboard agent's job API. Ray's workers inherit the
    token from the raylet; nothing else learns it. RAY_AUTH_MODE set by the user wins ('disabled'
    opts out; 'token' uses Ray's own sources, RAY_AUTH_TOKEN or ~/.ray/auth_token)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    ray._raylet.Config.initialize("")  # Ray caches its settings at import; this process is past it


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
            params.get("config_name", "sft_config"),
            params.get("overrides") or [],
            params.get("config_path"),
            Path(params["working_dir"]) if params.get("working_dir") else None,
        )
    except Exception as err:  # a bad config is reported by the flow body, with its key named
        logger.warning("could not read the flow run's ray_address (%s); starting a local Ray", err)
        return None
    return cfg.ray_address


def init_arguments(address: str | None) -> tuple[str, dict[str, Any]]:
    """ray.init's (address, kwargs) for a configured address, or for a local Ray of our own."""
    if address and address != "local":
        # A cluster started elsewhere has its own token, which Ray never sends to an explicit address
        # by itself (RayStart.wait names what to set when the cluster asks for one).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs: dict[str, Any] = {"namespace": "prefect"}
        if address.split(":")[0] in ("127.0.0.1", "localhost"):  # a cluster on this machine
            kwargs.update(pin_to_loopback())
        return address, kwargs
    # "local": a Ray of our own, even where `ray start` left a cluster that ray.init() would
    # otherwise join.
    own_token()
    return "local", {"namespace": "prefect", **local_init_kwargs()}


class _OwnSessionPopen(ray._private.services.ConsolePopen):
    """Ray's process start, in a session of its own (see `detach_from_stop_signals`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["start_new_session"] = True
        super().__init__(*args, **kwargs)


def detach_from_stop_signals() -> None:
    """Start the local Ray's processes (GCS, raylet and, through the raylet, the actors) outside this
    process's group. A worker cancels a flow run by SIGTERM to its process group: Ray's daemons died
    of it too, and Ray then aborted this process (SIGABRT) before the run had closed its MLflow run
    or freed its run folder, a race that CI lost. Outside the group only the flow gets the signal:
    it stops its actors and ends the run in order, and ray.shutdown then stops the daemons. They
    still die with this process when it is killed (Ray's parent-death signal). POSIX only."""
    if os.name == "posix":
        ray._private.services.ConsolePopen = _OwnSessionPopen


def keep_signals_with_python() -> None:
    """No C++ crash handler in this process's Ray core worker (the flow's; Ray's workers keep
    theirs). It takes SIGTERM at the C level, behind Python's back: a cancel printed a 'SIGTERM
    received ... PC: @' dump, as a crash does, and ray.shutdown reset SIGTERM to its default action,
    so that a second SIGTERM during a stop's cleanup killed the process with its flow run still
    Running. Python's faulthandler (enabled by `sft run`) still reports a native crash here."""
    ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read by ray.init


# Ray's per-node agents, by their process titles.
_AGENT_TITLES = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _own_processes() -> Iterator[int]:
    """The pids of this user's processes (Linux /proc; none elsewhere)."""
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        with contextlib.suppress(OSError):  # exited meanwhile
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == os.getuid():
                yield int(entry)


def reap_orphaned_ray_agents() -> list[int]:
    """SIGKILL this user's Ray agents whose raylet is gone, and return their pids. When a run's
    process is killed (kill -9), its raylet dies with it; Ray 2.60's agents notice, then wait
    forever on the dead GCS to report it, so each would hold ~100 MB until the machine restarts.
    An agent whose parent is no raylet (re-parented to init) is such an orphan. Linux only."""
    reaped = []
    for pid in _own_processes():
        try:
            if not _cmdline(pid).startswith(_AGENT_TITLES):
                continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if b"raylet" in _cmdline(ppid):
                continue
            os.kill(pid, signal.SIGKILL)
            reaped.append(pid)
        except (OSError, ValueError, IndexError):  # exited meanwhile, or not ours to read
            continue
    return reaped


def prune_ray_sessions(temp_dir: Path, keep: int = 20, min_age_s: float = 3600.0) -> list[str]:
    """Remove the session folders (logs) of this private Ray folder's ended clusters but the newest
    `keep`: each run's local Ray leaves one (~0.2 MB), which a schedule would pile up without end.
    A folder any process of this user still names on its command line (a running raylet, GCS) or
    newer than `min_age_s` (a cluster starting) stays. Returns the names removed."""
    sessions = sorted(p for p in temp_dir.glob("session_2*") if p.is_dir() and not p.is_symlink())
    old = [p for p in sessions[:-keep] if time.time() - p.stat().st_mtime > min_age_s] if keep else []
    if not old:
        return []
    named = b""
    for pid in _own_processes():
        with contextlib.suppress(OSError):
            named += _cmdline(pid) + b"\n"
    removed = []
    for p in old:
        if p.name.encode() not in named:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _without_stop_traces(lines: list[str]) -> list[str]:
    """`lines` less the tracebacks of Ray's own SIGTERM handler. A worker being stopped (its actor
    killed while its process still started, a cancel) raises SystemExit from that handler; where the
    signal lands in code that cannot raise (an import's callback, a __del__) Python prints it as
    'Exception ignored in ...' with a traceback: noise after a clear error, never the error."""
    kept: list[str] = []
    block: list[str] = []
    for line in lines:
        if block:
            block.append(line)
            if line[:1] not in (" ", "\t") and not line.startswith("Traceback"):  # the exception's line
                if not any("in sigterm_handler" in b for b in block):
                    kept.extend(block)
                block = []
        elif line.startswith(("Exception ignored", "Traceback (most recent call last)")):
            block = [line]
        else:
            kept.append(line)
    kept.extend(block)  # a traceback cut by the batch's end: left as it is
    return kept


def drop_stop_traces_from_worker_output() -> None:
    """Filter what Ray forwards of its workers' output to this process (`log_to_driver`)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for name, handler in list(dispatcher.handlers):
        if name != "ray_print_logs":
            continue

        def filtered(data: dict[str, Any], handler: Any = handler) -> None:
            if data.get("is_err"):
                data = {**data, "lines": _without_stop_traces(data.get("lines") or [])}
                if not data["lines"]:
                    return
            handler(data)

        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


class _NotMainThread(logging.Filter):
    """Ray warns that a background ray.init cannot set its SIGTERM handler; we set the same one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


logging.getLogger("ray._private.worker").addFilter(_NotMainThread())


class RayStart:
    """ray.init in a thread of its own; `wait()` returns once Ray is up, or raises its error.

    The thread lives on until `release()`, after Ray is shut down: Ray ties the processes it starts
    to the *thread* that started them (Linux's parent-death signal), so they would die with it."""

    def __init__(self, address: str, init_kwargs: dict[str, Any]):
        self.address, self.init_kwargs = address, init_kwargs
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._ready, self._released = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-start", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        began = time.perf_counter()
        try:
            if self.address == "local":
                if reaped := reap_orphaned_ray_agents():
                    logger.warning(
                        "stopped %d Ray agent(s) left by a killed run: pids %s", len(reaped), reaped
                    )
                if temp_dir := self.init_kwargs.get("_temp_dir"):
                    prune_ray_sessions(Path(temp_dir))
                detach_from_stop_signals()
            keep_signals_with_python()
            ray.init(self.address, **self.init_kwargs)
            drop_stop_traces_from_worker_output()
        except BaseException as err:  # raised again in whoever waits
            self.error = err
        self.seconds = time.perf_counter() - began
        self._ready.set()
        self._released.wait()

    def wait(self) -> None:
        self._ready.wait()
        if self.error is not None:
            if self.address != "local" and _refused_for_auth(self.error):
                raise ConfigError(
                    f"the Ray cluster at {self.address} (config key 'ray_address', or RAY_ADDRESS) requires "
                    "token authentication: set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, "
                    "or the file ~/.ray/auth_token) in the environment of the process that runs the flow "
                    "(for a deployment run, the Prefect worker's). Ray never sends a token to an explicit "
                    "address by itself."
                ) from self.error
            raise self.error

    def release(self) -> None:
        self._released.set()
        self._thread.join()


def _refused_for_auth(err: BaseException) -> bool:
    """ray.init's error, or one it was raised from, says the cluster wants a token it did not get."""
    seen: BaseException | None = err
    while seen is not None:
        if "InvalidAuthToken" in str(seen) or "Authentication token is missing" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def stop_monitor() -> None:
    """Kill the autoscaler monitor of the Ray this process started, ahead of `ray.shutdown`. The
    monitor does not exit on the SIGTERM that ray.shutdown sends it, and ray.shutdown waits a whole
    second before it kills it: a second at the end of every run. A Ray of one node on loopback has
    nothing for it to scale. Nothing happens where this process joined a Ray started elsewhere."""
    node = ray._private.worker._global_node
    if node is None or not node.head:
        return
    for info in node.all_processes.get(ray._private.ray_constants.PROCESS_TYPE_MONITOR, []):
        if info.process.poll() is None:
            info.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):  # ray.shutdown then sees to it
                info.process.wait(timeout=5)


_early: RayStart | None = None


def begin_local_start() -> None:
    """Start Ray for the flow run this process is about to make (`sft run`), so that it comes up
    while the flow is imported and its run created; the flow's task runner takes it over. Only
    where the runner would decide the same: no deployment parameters to read, no Ray running."""
    global _early
    if _early is None and not ray.is_initialized() and not os.environ.get("PREFECT__FLOW_RUN_ID"):
        set_local_defaults()
        _early = RayStart(*init_arguments(os.environ.get("RAY_ADDRESS")))


def take_early_start() -> RayStart | None:
    """The start `begin_local_start` made, handed to the one flow run that takes it over."""
    global _early
    start, _early = _early, None
    return start


def discard_early_start() -> None:
    """Shut down the Ray that `begin_local_start` started where no flow run took it over (the command
    stopped before its flow began): stopped mid-start, Ray's agents outlive the command, each
    holding ~100 MB until the next run reaps them (`reap_orphaned_ray_agents`). Waits for the start
    to end first: Ray's processes are only known once ray.init returns."""
    start = take_early_start()
    if start is None:
        return
    with contextlib.suppress(Exception):  # a failed start left nothing to shut down
        start.wait()
    if ray.is_initialized():
        stop_monitor()
        ray.shutdown()
    start.release()
