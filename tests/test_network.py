"""Closed by default: during a local run, every socket the run's processes listen on (the flow, Ray's
GCS, raylet, agents and workers) is bound to loopback."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow


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


def test_a_local_run_listens_on_loopback_only(prefect_server, tmp_path, demo_copy):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "+experiment=smoke", f"output_dir={out}",
         f"logging_dir={out}/tb", f"sft_train.data_args.file_name={demo_copy}/train.jsonl",
         f"validation.data_args.file_name={demo_copy}/validation.jsonl", "max_ckpt_to_keep=1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
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
