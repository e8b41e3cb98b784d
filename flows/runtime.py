"""Process environment for a run: local defaults, and one Prefect server shared by every process.

Without PREFECT_API_URL every process that touches Prefect starts its own temporary server, Ray
workers included, each with its own empty history. So before Ray starts we make sure a server is
up and export its URL; workers inherit it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sft_core.errors import UserError, exception_chain
from sft_core.home import sft_home
from sft_core.secrets import is_secret_env

DEFAULT_PORT = 4200
# How long the server sft started may take to answer before a run says it does not (a loaded machine).
OWN_SERVER_WAIT_S = 30.0


def set_local_defaults() -> None:
    """Environment defaults for a local run; anything the user already set wins."""
    home = sft_home()
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
        "RAY_USAGE_STATS_ENABLED": "0",
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


_RAISED = re.compile(r"[A-Za-z_][\w.]*(Error|Exception): ")


class PrefectServerError(UserError):
    """The local Prefect server could not be started; the message quotes why from its log."""


def _log_excerpt(log: Path, offset: int) -> str:
    """Why a server stopped, from what it wrote to `log` after `offset`: its last error line."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    raised = [line for line in lines if _RAISED.match(line)]  # "sqlalchemy.exc.DatabaseError: ..."
    errors = [line for line in lines if "error" in line.lower() or "in use" in line]
    return (raised or errors or lines or [""])[-1][:500]


def start_server(home: Path, port: int, wait_s: float = 120.0) -> tuple[str, subprocess.Popen]:
    """Start `prefect server start` on loopback in its own session; returns (api_url, process)."""
    if not _port_free(port):  # else whatever holds it would answer the health checks below
        raise PrefectServerError(f"cannot start the local Prefect server: port {port} is taken")
    home.mkdir(parents=True, exist_ok=True)
    # The server outlives the run: it gets none of the run's credentials (a secret moved off the
    # command line, system_envs, the local Ray's token), only its own settings (PREFECT_, and
    # libpq's PG* for a Postgres database).
    env = {k: v for k, v in os.environ.items() if k.startswith(("PREFECT_", "PG")) or not is_secret_env(k)}
    env["PREFECT_HOME"] = str(home)
    env.pop("PREFECT_API_URL", None)
    # The UI asks this server which API to call: left to Prefect's defaults it names port 4200 whatever
    # --port says, so a server on another port showed the data of whichever server held 4200.
    api_url = f"http://127.0.0.1:{port}/api"
    env.update(
        PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_API_URL=api_url
    )
    log_path = home / "server.log"
    log = open(log_path, "ab")  # noqa: SIM115 - stays open for the server's lifetime
    offset = log.tell()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PrefectServerError(
                f"the local Prefect server (port {port}) exited at start with code {proc.returncode}: "
                f"{_log_excerpt(log_path, offset)!r}; its log is {log_path}. Set PREFECT_API_URL to use "
                "a server of your own."
            )
        if _healthy(api_url):
            return api_url, proc
        time.sleep(0.5)
    stop_process_group(proc.pid)
    raise PrefectServerError(
        f"the local Prefect server (port {port}) did not answer within {wait_s:.0f}s; its log is {log_path}"
    )


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc), which tells it from a later process
    given the same pid; None where unknown (not Linux, or no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command's name


def _own_record(home: Path) -> dict[str, Any] | None:
    """server.json of the server `sft` started under this PREFECT_HOME, if that process still runs:
    the recorded pid, started when recorded (a pid reused after a crash or a reboot is not it).
    Whether it answers is another question (`_own_server`)."""
    try:
        info = json.loads((home / "server.json").read_text())
        os.kill(info["pid"], 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if "started" not in info:  # recorded before start times were: its answering must tell
        return info if _healthy(info["api_url"]) else None
    return info if _process_start(info["pid"]) == info["started"] else None


def _own_server(home: Path, wait_s: float = OWN_SERVER_WAIT_S) -> str | None:
    """The API URL of the server `sft` started under this PREFECT_HOME, if it still runs; given
    `wait_s` to answer (a loaded machine), else PrefectServerError: it is not taken for someone
    else's, and no second server is started on its database."""
    info = _own_record(home)
    if info is None:
        return None
    deadline = time.monotonic() + wait_s
    while not _healthy(info["api_url"]):
        if time.monotonic() > deadline:
            raise PrefectServerError(
                f"the Prefect server sft started (pid {info['pid']}, {info['api_url']}) does not answer "
                f"within {wait_s:g}s; see {home / 'server.log'}, or stop it with `sft server stop`"
            )
        time.sleep(1.0)
    return str(info["api_url"])


def _serves_home(api_url: str, home: Path) -> bool:
    """Whether the Prefect server at `api_url` says it keeps its database under `home`."""
    try:
        with urllib.request.urlopen(f"{api_url}/admin/settings", timeout=5) as r:
            served = json.loads(r.read()).get("home")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(served, str) and Path(served).resolve() == home.resolve()


def ensure_server() -> tuple[str, bool]:
    """Use PREFECT_API_URL if set; else reuse the server sft started before (recorded under
    PREFECT_HOME) or start one: on 4200 when free, else on a free port. Another program on 4200,
    even another Prefect server, is never taken for ours. Returns (api_url, started)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"], False
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    # One process at a time looks for the server and starts one: two `sft run` started together
    # would both start a server on the same database (racing migrations: one dies) and port. The
    # second waits and reuses the first's; a frozen holder costs the timeout, not forever.
    lock = FileLock(str(home / "server.lock"))
    try:
        lock.acquire(timeout=180)
    except Timeout:
        raise PrefectServerError(
            f"another process has been starting the local Prefect server under {home} for over 180 s "
            f"(it holds {lock.lock_file}); see {home / 'server.log'}"
        ) from None
    try:
        api_url = _own_server(home)
        started = api_url is None
        if api_url is None:
            default_url = f"http://127.0.0.1:{DEFAULT_PORT}/api"
            if not _port_free(DEFAULT_PORT) and _serves_home(default_url, home):
                # Not taken for ours (it may be anything answering so), nor joined by a second server
                # on the same database: two servers on one sqlite file lock each other out.
                raise PrefectServerError(
                    f"a Prefect server that sft did not start serves this PREFECT_HOME ({home}) on port "
                    f"{DEFAULT_PORT}: stop it and let sft start its own (`sft server start`), or use it "
                    f"with PREFECT_API_URL={default_url}"
                )
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()
            try:
                api_url, proc = start_server(home, port)
            except PrefectServerError:
                if port != DEFAULT_PORT or _port_free(port):
                    raise
                # Another program took 4200 between the check and the start.
                api_url, proc = start_server(home, free_port())
            record = {"pid": proc.pid, "started": _process_start(proc.pid), "api_url": api_url}
            (home / "server.json").write_text(json.dumps(record))
    finally:
        lock.release()
    os.environ["PREFECT_API_URL"] = api_url
    return api_url, started


def stop_process_group(pid: int) -> None:
    """SIGTERM to the group led by `pid`, SIGKILL to what is left of it after 5 s; returns once it
    is gone (a killed process takes a moment to exit on a loaded machine), or after 5 s more."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for sig in (signal.SIGKILL, None):
        for _ in range(50):
            # A leader that is our own child stays in its group as a zombie until it is reaped.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)


def stop_server() -> bool:
    """Stop the server `sft run` started (and everything it spawned); False if none is running."""
    home = Path(os.environ["PREFECT_HOME"])
    record = home / "server.json"
    if _own_record(home) is None:
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
