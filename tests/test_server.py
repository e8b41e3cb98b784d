"""One Prefect server, really stopped: `sft run` reuses the server it started, never another program
on port 4200 (even one that answers like Prefect), and `sft server stop` stops what it started."""

from __future__ import annotations

import http.server
import os
import socket
import threading

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
        api_url, started = runtime.ensure_server()
        assert started and f":{runtime.DEFAULT_PORT}/" not in api_url, api_url
        monkeypatch.delenv("PREFECT_API_URL")
        again, started_again = runtime.ensure_server()  # a second `sft run`
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
