"""One Prefect server, really stopped: `sft run` reuses the server it started, never another program
on port 4200 (even one that answers like Prefect); two started together share one server; `sft server
stop` stops what it started; a server that cannot start says why."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request

import psutil
import pytest

from flows import runtime

pytestmark = pytest.mark.slow


class _FakeHealth(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


def test_reuses_its_own_server_never_a_stranger_on_4200_and_stops_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    stranger = None
    if runtime._port_free(runtime.DEFAULT_PORT):  # else something else already holds it: as good
        stranger = http.server.HTTPServer(("127.0.0.1", runtime.DEFAULT_PORT), _FakeHealth)
        threading.Thread(target=stranger.serve_forever, daemon=True).start()
    try:
        # Two `sft run` at once on a fresh home: before the lock, both started a server on the same
        # new database, and one died in the migrations it raced.
        code = "import json; from flows import runtime; print(json.dumps(runtime.ensure_server()))"
        both = [
            subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        answers = []
        for proc in both:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            answers.append(json.loads(out.strip().splitlines()[-1]))
        (api_url, _), (other_url, _) = answers
        assert api_url == other_url and sorted(started for _, started in answers) == [False, True], answers
        assert f":{runtime.DEFAULT_PORT}/" not in api_url, api_url
        again, started_again = runtime.ensure_server()  # a third `sft run`, later
        assert (again, started_again) == (api_url, False)
        port = int(api_url.rsplit(":", 1)[1].split("/")[0])
        owner = next(
            c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"
        )
        assert runtime.stop_server()
        assert not psutil.pid_exists(owner) or psutil.Process(owner).status() == psutil.STATUS_ZOMBIE
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing left listening
        assert not runtime.stop_server()  # nothing of ours is running any more
    finally:
        if stranger:
            stranger.shutdown()
        os.environ.pop("PREFECT_API_URL", None)


def test_a_server_that_cannot_start_says_why(tmp_path):
    home = tmp_path / "prefect"
    home.mkdir()
    (home / "prefect.db").write_bytes(os.urandom(4096))  # a damaged database
    with pytest.raises(runtime.PrefectServerError) as err:
        runtime.start_server(home, runtime.free_port())
    assert "file is not a database" in str(err.value) and str(home / "server.log") in str(err.value)


def test_a_taken_port_is_never_taken_for_our_server(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(runtime.PrefectServerError, match="is taken"):
            runtime.start_server(tmp_path, held.getsockname()[1])
    assert not (tmp_path / "server.log").exists()  # nothing was started


def test_the_server_that_outlives_a_run_gets_none_of_its_credentials(tmp_path, monkeypatch):
    """A secret moved off `sft run`'s command line, a system_envs credential and the local Ray's
    token are in the run's environment; the Prefect server it starts keeps running after it."""
    for name in ("HF_TOKEN", "SFT_SECRET_TRACKER_KWARGS_API_KEY", "OPENAI_KEY", "RAY_AUTH_TOKEN"):
        monkeypatch.setenv(name, "secret-value")
    monkeypatch.setenv("SOME_SETTING", "kept")
    api_url, proc = runtime.start_server(tmp_path / "prefect", runtime.free_port())
    try:
        environ = psutil.Process(proc.pid).environ()
        assert not {k for k, v in environ.items() if v == "secret-value"}
        assert environ["SOME_SETTING"] == "kept" and environ["PREFECT_HOME"] == str(tmp_path / "prefect")
        # Its UI calls this server's API, not Prefect's default port 4200 (another server's data).
        ui = json.loads(
            urllib.request.urlopen(api_url.removesuffix("/api") + "/ui-settings", timeout=10).read()
        )
        assert ui["api_url"] == api_url
    finally:
        runtime.stop_process_group(proc.pid)


def test_a_recorded_pid_now_taken_by_another_process_is_not_our_server(tmp_path, monkeypatch):
    """After a crash or a reboot the recorded pid may be another program's: `sft server stop` must
    not kill its process group, and `sft run` must not take the server it names for its own."""
    home = tmp_path / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    api_url, server = runtime.start_server(home, runtime.free_port())
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (home / "server.json").write_text(json.dumps({"pid": other.pid, "started": "1", "api_url": api_url}))
        assert runtime._own_record(home) is None
        assert not runtime.stop_server()
        assert other.poll() is None  # alive: never signalled
        # A record of the process itself is ours, and is stopped.
        record = {"pid": server.pid, "started": runtime._process_start(server.pid), "api_url": api_url}
        (home / "server.json").write_text(json.dumps(record))
        assert runtime._own_server(home) == api_url
        assert runtime.stop_server() and not runtime._healthy(api_url)
    finally:
        other.kill()
        runtime.stop_process_group(server.pid)


def test_a_server_sft_did_not_start_on_the_same_database_is_not_joined_by_a_second(tmp_path, monkeypatch):
    """`sft server stop`, then `prefect server start` by hand under the same PREFECT_HOME: the next
    `sft run` started a second server on the same sqlite database (locks, dropped events)."""
    home = tmp_path / "prefect"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    port = runtime.free_port()
    monkeypatch.setattr(runtime, "DEFAULT_PORT", port)
    api_url, by_hand = runtime.start_server(home, port)  # no server.json: not sft's
    try:
        assert runtime._serves_home(api_url, home) and not runtime._serves_home(api_url, tmp_path / "other")
        with pytest.raises(
            runtime.PrefectServerError, match="that sft did not start serves this PREFECT_HOME"
        ):
            runtime.ensure_server()
    finally:
        runtime.stop_process_group(by_hand.pid)


def test_its_own_server_answering_slowly_is_neither_taken_for_a_strangers_nor_doubled(tmp_path, monkeypatch):
    """A loaded machine: the server sft started answers late or not at all. It is still sft's: a run
    says so (it neither refuses it as another program's nor starts a second server on its database),
    and `sft server stop` stops it."""
    import signal

    home = tmp_path / "prefect"
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setattr(runtime, "OWN_SERVER_WAIT_S", 3.0)
    api_url, started = runtime.ensure_server()
    os.environ.pop("PREFECT_API_URL", None)
    pid = json.loads((home / "server.json").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(runtime.PrefectServerError, match=f"the Prefect server sft started \\(pid {pid}"):
            runtime.ensure_server()
        assert runtime.stop_server()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        runtime.stop_process_group(pid)
        os.environ.pop("PREFECT_API_URL", None)
