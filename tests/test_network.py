"""Closed by default: during a local run, every socket the run's processes listen on (the flow, Ray's
GCS, raylet, agents and workers) is bound to loopback."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest


def is_loopback(host: str) -> bool:
    ip = ipaddress.ip_address(host)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def listening(root: psutil.Process) -> dict[tuple[str, int], str]:
    found = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found[(c.laddr.ip, c.laddr.port)] = " ".join(p.cmdline()[:3])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
def test_a_local_run_listens_on_loopback_only(prefect_server, tmp_path, demo_copy):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_AUTH_MODE")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "+experiment=smoke", f"output_dir={out}",
         f"logging_dir={out}/tb", f"sft_train.data_args.file_name={demo_copy}/train.jsonl",
         f"validation.data_args.file_name={demo_copy}/validation.jsonl", "max_ckpt_to_keep=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    from sft_core.home import private_tmp

    stores = set(private_tmp().glob("store-*"))  # the process group's rendezvous files
    sockets: dict[tuple[str, int], str] = {}
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            if list(out.glob("runs/*/sft_train/checkpoint-3")):  # mid-training: everything is up
                sockets = listening(psutil.Process(proc.pid))
                break
            time.sleep(0.5)
        log, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-3000:]
    assert set(private_tmp().glob("store-*")) == stores  # its own was removed at shutdown
    assert len(sockets) >= 3, sockets  # GCS, raylet, workers... were seen
    print(sorted(sockets))
    exposed = {addr: who for addr, who in sockets.items() if not is_loopback(addr[0])}
    assert not exposed, exposed

    # max_ckpt_to_keep=1 pruned this run's older checkpoint together with its registered version,
    # unless the registry's `best` points at it.
    from mlflow import MlflowClient

    uri = f"sqlite:///{out}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    left = {p.name for p in out.glob("runs/*/sft_train/checkpoint-*")}
    versions = {int(v.version): v for v in client.search_model_versions("name='smoke-sft'")}
    best = int(client.get_model_version_by_alias("smoke-sft", "best").version)
    assert "checkpoint-6" in left and versions.keys() == ({1, 2} if best == 1 else {2})
    assert left == ({"checkpoint-3", "checkpoint-6"} if best == 1 else {"checkpoint-6"})
    for v in versions.values():
        assert (Path(v.source.removeprefix("file://")) / "model.safetensors").is_file()


_LOCAL_RAY = """
import json, sys, urllib.request
import ray
from flows.ray_start import init_arguments, RayStart
start = RayStart(*init_arguments(None))
start.wait()
node = ray._private.worker._global_node
print(json.dumps({"gcs": node.gcs_address, "agent": node._ray_params.dashboard_agent_listen_port,
                  "session": node.get_session_dir_path()}), flush=True)

@ray.remote
def uid():
    import os
    return os.getuid()

assert ray.get(uid.remote(), timeout=60) == __import__("os").getuid()  # the run itself is served
print("ready", flush=True)
sys.stdin.read()  # until the test is done
"""

_INTRUDER = """
import sys, ray
ray.init(sys.argv[1], logging_level="error", _node_ip_address="127.0.0.1")
@ray.remote
def touch(path):
    open(path, "w").close()
ray.get(touch.remote(sys.argv[2]), timeout=30)
"""


def test_no_other_process_of_the_machine_can_run_code_in_a_local_runs_ray(tmp_path):
    """A local run's Ray takes a token of the run's own: a process that finds its GCS port (any
    user's: loopback checks no uid) can neither join it nor submit a job to its dashboard agent."""
    # A user's shell; the Ray client kept to loopback as the run's Ray is.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"
    }
    run = subprocess.Popen([sys.executable, "-c", _LOCAL_RAY], env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        ports = json.loads(run.stdout.readline())
        assert run.stdout.readline().strip() == "ready"
        marker = tmp_path / "PWNED"
        intruder = subprocess.run([sys.executable, "-c", _INTRUDER, ports["gcs"], str(marker)], env=env,
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
        assert intruder.returncode != 0 and "auth" in intruder.stderr.lower(), intruder.stderr[-2000:]
        job = json.dumps({"entrypoint": f"touch {marker}"}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{ports['agent']}/api/job_agent/jobs/", data=job,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(OSError):  # refused (401) where the agent listens; nothing where not
            urllib.request.urlopen(request, timeout=10)
        time.sleep(2)
        assert not marker.exists()
        # Its logs (the runtime_env agent's hold the workers' environment) in a folder of this
        # user's alone, not in the machine's shared /tmp/ray that Ray opens to all.
        private = Path(ports["session"]).parent.parent
        assert private.stat().st_mode & 0o777 == 0o700 and private.stat().st_uid == os.getuid()
    finally:
        run.communicate(input="", timeout=120)


@pytest.mark.parametrize("how", ["open to others", "a link", "a link to nowhere", "a file"])
def test_a_private_temp_folder_that_is_not_private_is_refused(tmp_path, monkeypatch, how):
    import tempfile

    from sft_core.errors import ConfigError
    from sft_core.home import private_tmp

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert private_tmp() == tmp_path / f"sft-{os.getuid()}"  # made 0700 where missing
    private_tmp().rmdir()
    if how == "a link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        (tmp_path / f"sft-{os.getuid()}").symlink_to(tmp_path / "elsewhere")
    elif how == "a link to nowhere":
        (tmp_path / f"sft-{os.getuid()}").symlink_to(tmp_path / "nowhere")
    elif how == "a file":
        (tmp_path / f"sft-{os.getuid()}").write_text("")
    else:
        (tmp_path / f"sft-{os.getuid()}").mkdir(mode=0o700)
        (tmp_path / f"sft-{os.getuid()}").chmod(0o777)
    with pytest.raises(ConfigError, match="is not a folder, is a link, another user's, or open to others"):
        private_tmp()
