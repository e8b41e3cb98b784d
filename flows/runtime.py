"""Process environment for a run: local defaults, and one Prefect server shared by every process.

Without PREFECT_API_URL every process that touches Prefect starts its own temporary server, Ray
workers included, each with its own empty history. So before Ray starts we make sure a server is
up and export its URL; workers inherit it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from sft_core.errors import exception_chain
from sft_core.home import sft_home

DEFAULT_PORT = 4200


def set_local_defaults() -> None:
    """Environment defaults for a local run; anything the user already set wins."""
    home = sft_home()
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_DEDUP_LOGS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int, wait_s: float = 120.0) -> tuple[str, subprocess.Popen]:
    """Start `prefect server start` on loopback in its own session; returns (api_url, process)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "ab")  # noqa: SIM115 - stays open for the server's lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the Prefect server exited early (code {proc.returncode}); see {home / 'server.log'}"
            )
        if _healthy(api_url):
            return api_url, proc
        time.sleep(0.5)
    stop_process_group(proc.pid)
    raise RuntimeError(
        f"the Prefect server did not become healthy in {wait_s:.0f}s; see {home / 'server.log'}"
    )


def _own_server(home: Path) -> str | None:
    """The API URL of the server `sft` started under this PREFECT_HOME, if it is still that server."""
    record = home / "server.json"
    try:
        info = json.loads(record.read_text())
        os.kill(info["pid"], 0)  # still running (pids are recorded with the port they serve)
    except (OSError, ValueError, KeyError):
        return None
    return info["api_url"] if _healthy(info["api_url"]) else None


def server_running() -> bool:
    """Whether `ensure_server` would find a server without starting one (a cheap check)."""
    return (
        bool(os.environ.get("PREFECT_API_URL")) or _own_server(Path(os.environ["PREFECT_HOME"])) is not None
    )


def ensure_server() -> tuple[str, bool]:
    """Use PREFECT_API_URL if set; else reuse the server sft started before (recorded under
    PREFECT_HOME) or start one: on 4200 when free, else on a free port. Another program on 4200,
    even another Prefect server, is never taken for ours. Returns (api_url, started)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], False
    home = Path(os.environ["PREFECT_HOME"])
    api_url = _own_server(home)
    if api_url:
        os.environ["PREFECT_API_URL"] = api_url
        return api_url, False
    port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()
    api_url, proc = start_server(home, port)
    (home / "server.json").write_text(json.dumps({"pid": proc.pid, "api_url": api_url}))
    os.environ["PREFECT_API_URL"] = api_url
    return api_url, True


def stop_process_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop_server() -> bool:
    """Stop the server `sft run` started (and everything it spawned); False if none is running."""
    home = Path(os.environ["PREFECT_HOME"])
    record = home / "server.json"
    if _own_server(home) is None:
        record.unlink(missing_ok=True)
        return False
    stop_process_group(json.loads(record.read_text())["pid"])
    record.unlink(missing_ok=True)
    return True


def lost_prefect_api(err: BaseException | None, api_url: str | None = None) -> BaseException | None:
    """The connection failure behind `err` when it is the Prefect API (`api_url`, by default the
    configured one) that stopped answering: a server stopped or restarted mid-run, after Prefect's
    client retried. A failed request to anywhere else (a model hub) is not one."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    api = urllib.parse.urlsplit(api_url or PREFECT_API_URL.value() or "")
    for failure in exception_chain(err):
        if isinstance(failure, httpx.TransportError):
            try:
                url = failure.request.url
            except RuntimeError:  # raised outside a client's request: whose is unknown
                url = None
            if (
                url is not None
                and api.netloc
                and (url.scheme, url.netloc.decode()) == (api.scheme, api.netloc)
            ):
                return failure
    return None


def mark_crashed(flow_run_id: str, why: str) -> bool:
    """Set a flow run that can no longer be running to Crashed, unless its state is final already. A
    process killed with SIGKILL cannot report its own end: its run would stay RUNNING, which the UI
    does not offer to retry. Returns whether the state was changed."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(flow_run_id).state
        except ObjectNotFound:  # deleted since, or a run of another Prefect server
            return False
        if state is None or state.is_final():
            return False
        client.set_flow_run_state(flow_run_id, Crashed(message=why), force=True)
    return True
