"""Helpers the tests share (fixtures stay in conftest.py): demo data encoded for a cluster, a
training loop on real Ray actors, the CLI in a subprocess, and where a run wrote its checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: conftest imports this module before it sets the environment
    from sft_core.train.artifacts import TrainArtifacts

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"


def encoded_demo(out: Path, tokenizer, model_dir: Path, *, packing: bool) -> TrainArtifacts:
    """The demo train split encoded (native template, 256 tokens) and planned into rows: the
    artifacts a training Cluster takes, for tests that drive the workers without the flow."""
    from sft_core.data.encode import encode_files
    from sft_core.data.messages import FieldMapping
    from sft_core.data.packing import plan_rows
    from sft_core.data.spec import EncodeSpec
    from sft_core.train.artifacts import SplitFiles, TrainArtifacts

    spec = EncodeSpec(256, fields=FieldMapping(query_key="input", system_key="system"))
    data, _ = encode_files([str(DEMO / "train.jsonl")], tokenizer, spec)
    data.save(out / "train.npz")
    (out / "plan.json").write_text(json.dumps(plan_rows(data, 256, packing=packing).to_dict()))
    return TrainArtifacts(
        model_dir=str(model_dir),
        tokenizer_dir=str(model_dir),
        train=SplitFiles(str(out / "train.npz"), str(out / "plan.json")),
    )


def train_on_cluster(cfg, artifacts: TrainArtifacts, steps: int) -> tuple[dict, list[float], list[float]]:
    """Train `steps` steps on real Ray actors; rank 0's final weights, the per-token loss and the
    grad norm of each step."""
    from sft_core.cluster.cluster import Cluster

    cluster = Cluster(cfg)
    try:
        cluster.start(artifacts)
        infos = cluster.execute_all("initialize")
        # The actors started with the allocator environment that keep_host_memory asks for.
        assert {i.keeps_host_memory for i in infos} == {cfg.sft_train.keep_host_memory}
        assert {i.niceness for i in infos} == {0}, "training actors run at the default priority"
        results = [cluster.execute_all("train_step", s) for s in range(steps)]
        for step in results:  # each supervised token counted exactly once over the ranks
            assert sum(r.stats.targets for r in step) == step[0].num_targets
        losses = [sum(r.stats.loss_sum for r in step) / step[0].num_targets for step in results]
        return cluster.execute_all("state_dict")[0], losses, [s[0].stats.grad_norm for s in results]
    finally:
        cluster.shutdown()


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str | None] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`sft <args>` in this environment changed by `env` (a None value removes the variable)."""
    # A run writes MLflow under its output_dir unless the caller says otherwise.
    merged = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env={k: v for k, v in merged.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_folders(out: Path) -> list[Path]:
    """The run folders a pipeline made in `out`, oldest first (their names start with a UTC stamp)."""
    return sorted(p for p in (out / "runs").iterdir() if p.is_dir())


def checkpoint_path(out: Path, step: int, run: int = -1) -> Path:
    """<out>/runs/<run>/sft_train/checkpoint-<step> of the newest run (or the `run`-th)."""
    return run_folders(out)[run] / "sft_train" / f"checkpoint-{step}"


def worker_pids(root: int) -> list[int]:
    """SFTWorker processes under `root` (one test's run only, never another run's on the machine)."""
    import psutil

    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::SFTWorker"):
                found.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(found)


def _empty_prefect_db() -> Path:
    """A migrated Prefect database with no runs yet, saved from the session's server: a test's own
    server starts on a copy in ~7 s instead of migrating a new one (~17 s on this machine)."""
    return Path(os.environ["SFT_HOME"]) / "prefect-empty.db"


def save_empty_prefect_database(db: Path) -> None:
    import sqlite3

    with (
        contextlib.closing(sqlite3.connect(db)) as src,
        contextlib.closing(sqlite3.connect(_empty_prefect_db())) as dst,
    ):
        src.backup(dst)


def new_prefect_home(home: Path) -> Path:
    """A PREFECT_HOME for a test's own server, its database a copy of the session's empty one."""
    home.mkdir(parents=True)
    if _empty_prefect_db().is_file():
        shutil.copyfile(_empty_prefect_db(), home / "prefect.db")
    return home


@contextlib.contextmanager
def ray_head(log: Path, env: dict[str, str], num_cpus: int = 2) -> Iterator[int]:
    """`ray start --head` on loopback for one test; yields its GCS port. Found only through that
    address: `--block` in a process group stopped as a whole (`ray stop` would stop every Ray on the
    machine, other sessions' too), and a temp dir of its own (`ray start` records its address in
    /tmp/ray, where a bare ray.init() anywhere on the machine would find and join it)."""
    from flows.runtime import free_port, stop_process_group

    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="sft-ray-")  # short: Ray's socket paths live under it
    with log.open("w") as f:
        head = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
             f"--temp-dir={temp_dir}"],
            env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        yield port
    finally:
        stop_process_group(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def wait_for_http(
    url: str, process: subprocess.Popen, output: Callable[[], str], timeout_s: float = 180
) -> None:
    """Wait until `url` answers, failing with the process's `output()` if it exits first."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, output()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout_s:.0f} s"
            time.sleep(1)
