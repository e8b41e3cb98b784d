"""The pipeline run as a service: through a deployment and a process worker, with faults injected.

- a worker killed mid-run, the flow run failed, then `prefect flow-run retry`: the retry continues
  from the run's newest checkpoint in the same run folder and MLflow run, data stages Cached;
- a worker frozen (SIGSTOP) mid-run of `sft run`: the step fails within worker_timeout_s naming the
  rank, and the flow restarts the cluster from the newest checkpoint by itself (max_restarts);
- a deployment run with `ray_address` joins that Ray cluster and finds the encodings that `sft run`
  cached; the same deployment run again into its output_dir, as a schedule runs it: both succeed,
  the first run's checkpoints and registered versions are untouched (sha256).

Runs are shared where tests look at different sides of one: each costs a minute of CI.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.runtime import stop_process_group
from tests.helpers import DEMO, REPO, ray_head, run_folders, worker_pids

pytestmark = pytest.mark.slow

POOL = "sft-service-tests"


def prefect(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PWD": str(REPO)}  # prefect.yaml's pull step records the deploy directory
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def deployment(prefect_server, tmp_path_factory) -> int:
    """The `smoke` deployment of prefect.yaml on a pool of this module's own, with a process worker;
    yields the worker's pid (flow runs, Ray and the SFT workers run under it)."""
    prefect("work-pool", "create", POOL, "--type", "process")  # may exist from an earlier module
    deployed = prefect("--no-prompt", "deploy", "--name", "smoke", "--pool", POOL)
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    home = tmp_path_factory.mktemp("worker")
    # The worker gets no Prefect or Ray setting of ours: a plain user's shell (its own HOME), plus
    # the server's URL and the project's SFT_HOME. The flow must set up the rest itself.
    ours = ("PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_USAGE_STATS_ENABLED")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ours} | {"HOME": str(home)}
    with (home / "worker.log").open("w") as f:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
            cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )  # fmt: skip
    yield worker.pid
    stop_process_group(worker.pid)


def start_run(overrides: list[str]) -> str:
    out = prefect("deployment", "run", "sft-pipeline/smoke", "--param", f"overrides={json.dumps(overrides)}")
    assert out.returncode == 0, out.stdout + out.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)


def flow_state(run_id: str) -> str:
    from prefect.client.orchestration import get_client

    async def read() -> str:
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).state.type.value

    return asyncio.run(read())


def wait_state(run_id: str, states: set[str], timeout: float = 480) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = flow_state(run_id)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} still {flow_state(run_id)} after {timeout}s")


def task_states(run_id: str) -> dict[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, list[str]]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
            out: dict[str, list[str]] = {}
            for t in sorted(runs, key=lambda t: t.created):  # oldest first: the retry's last
                out.setdefault(t.name, []).append(t.state.name)
            return out

    return asyncio.run(read())


def wait_for(pattern: str, root: Path, proc_ok=lambda: True, timeout: float = 400) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(root.glob(pattern))
        if found:
            return found[0]
        assert proc_ok(), f"the run ended before {pattern} appeared"
        time.sleep(0.2)
    raise AssertionError(f"{pattern} did not appear in {timeout}s")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def smoke_overrides(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "+experiment=smoke",
        f"output_dir={out}", f"logging_dir={out}/tb",
        f"sft_train.data_args.file_name={data}/train.jsonl",
        f"validation.data_args.file_name={data}/validation.jsonl",
        *extra,
    ]  # fmt: skip


def mlflow_client(out: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{out}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_retry_of_a_failed_deployment_run_resumes_from_its_newest_checkpoint(deployment, tmp_path, demo_copy):
    out = tmp_path / "out"
    run_id = start_run(smoke_overrides(out, demo_copy, "sft_train.max_restarts=0"))
    ckpt3 = wait_for("runs/*/sft_train/checkpoint-3/manifest.json", out).parent
    before = tree_digest(ckpt3)
    os.kill(worker_pids(deployment)[-1], signal.SIGKILL)
    assert wait_state(run_id, {"FAILED", "CRASHED", "COMPLETED"}) in ("FAILED", "CRASHED")
    assert not (ckpt3.parent / "checkpoint-6").exists()

    retried_at = time.time()
    retry = prefect("flow-run", "retry", run_id)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert wait_state(run_id, {"FAILED", "CRASHED", "COMPLETED"}) == "COMPLETED"

    # The same run folder, continued: checkpoint-3 untouched, checkpoint-6 beside it.
    assert len(run_folders(out)) == 1
    assert tree_digest(ckpt3) == before
    assert (ckpt3.parent / "checkpoint-6" / "sft_train" / "model.safetensors").is_file()
    # The retry's data stages came from the cache; training resumed after step 3, not from 0.
    states = task_states(run_id)
    for name in ("encode-train", "encode-validation", "pack-train", "pack-validation"):
        assert states[name][-1] == "Cached", (name, states[name])
    assert len(states["train-steps-0-3"]) == 1 and len(states["train-steps-3-6"]) == 2, states

    # One MLflow run: every step's loss exactly once; two versions at distinct checkpoints.
    client = mlflow_client(out)
    runs = client.search_runs([client.get_experiment_by_name("smoke-sft").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    loss = client.get_metric_history(runs[0].info.run_id, "sft_train/loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]
    versions = client.search_model_versions("name='smoke-sft'")
    assert sorted(int(v.tags["global_step"]) for v in versions) == [3, 6]
    assert len({v.source for v in versions}) == 2 and all(v.run_id == runs[0].info.run_id for v in versions)
    first_new_step = min(m.timestamp for m in loss if m.step == 4) / 1000
    seconds = first_new_step - retried_at
    print(f"retry -> first new step: {seconds:.1f}s")  # bench/results/retry-resume.json holds one measure
    assert seconds > 0


@pytest.fixture(scope="module")
def frozen_worker_run(prefect_server, tmp_path_factory) -> SimpleNamespace:
    """`sft run` on data no other test has encoded, one of its workers frozen (SIGSTOP) once
    checkpoint-3 is written. Two tests read this run: the frozen worker's (the timeout, the restart)
    and the ray_address one's (a deployment run finds the encodings this `sft run` cached)."""
    root = tmp_path_factory.mktemp("frozen")
    data = root / "data"
    shutil.copytree(DEMO, data)
    with (data / "train.jsonl").open("a") as f:
        f.write(json.dumps({"instruction": f"Say {time.time_ns()}", "input": "", "output": "Done."}) + "\n")
    out = root / "out"
    args = [
        "run",
        *smoke_overrides(out, data, "sft_train.worker_timeout_s=20", "sft_train.max_restarts=1"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    ckpt3 = wait_for("runs/*/sft_train/checkpoint-3/manifest.json", out, lambda: proc.poll() is None).parent
    before = tree_digest(ckpt3)
    frozen = worker_pids(proc.pid)[-1]
    os.kill(frozen, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        log, _ = proc.communicate(timeout=400)
    finally:
        if Path(f"/proc/{frozen}").exists():
            os.kill(frozen, signal.SIGKILL)
    return SimpleNamespace(
        out=out, data=data, log=log, returncode=proc.returncode, ckpt3=ckpt3, ckpt3_before=before,
        seconds_after_freeze=time.monotonic() - stopped_at,
    )  # fmt: skip


def test_a_frozen_worker_fails_the_step_by_the_timeout_and_the_run_recovers_by_itself(frozen_worker_run):
    run = frozen_worker_run
    assert run.returncode == 0, run.log[-4000:]
    found = re.search(r"rank\(s\) \[(\d)\] stopped responding during (\w+) \(([^)]*)\)", run.log)
    assert found, run.log[-4000:]
    assert "restarting the cluster (restart 1 of sft_train.max_restarts=1)" in run.log
    assert run.seconds_after_freeze < 400
    assert tree_digest(run.ckpt3) == run.ckpt3_before  # restarted from it, did not rewrite it
    client = mlflow_client(run.out)
    runs = client.search_runs([client.get_experiment_by_name("smoke-sft").experiment_id])
    assert len(runs) == 1
    loss = client.get_metric_history(runs[0].info.run_id, "sft_train/loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def ray_address_run(deployment, frozen_worker_run, tmp_path_factory) -> SimpleNamespace:
    """`ray start --head` on loopback, then a deployment run with `ray_address` pointing at it, of
    the data that only the frozen-worker `sft run` has encoded, into an output_dir of its own. Two
    tests read this run: one for the Ray cluster it joined and the cache it found, one as the first
    of two scheduled runs into that output_dir (the cluster stays up for the second)."""
    root = tmp_path_factory.mktemp("ray-address")
    data = frozen_worker_run.data

    # A cluster started without token authentication: a flow joining an explicit address sends none.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    with ray_head(root / "ray-head.log", env) as port:  # stays up for the second run
        out = root / "dep"
        overrides = smoke_overrides(out, data, f"ray_address=127.0.0.1:{port}")
        run_id = start_run(overrides)
        state = wait_state(run_id, {"FAILED", "CRASHED", "COMPLETED"})
        jobs = subprocess.run(
            [sys.executable, "-c", "import ray, ray._private.state as s; "
             f"ray.init(address='127.0.0.1:{port}', _node_ip_address='127.0.0.1', logging_level='error'); "
             "print(len(s.jobs()))"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        yield SimpleNamespace(run_id=run_id, state=state, jobs=jobs, out=out, data=data, overrides=overrides)


def test_a_deployment_run_joins_its_ray_address_and_reuses_what_the_cli_cached(ray_address_run):
    """ray_address works in a deployment run as in the CLI, with no RAY_ADDRESS in the worker; and
    the worker's runs find the encodings that `sft run` cached (one result cache, not one per home):
    here the frozen-worker run's, the only one to have encoded this data."""
    run = ray_address_run
    assert run.state == "COMPLETED"
    states = task_states(run.run_id)
    assert states["encode-train"] == ["Cached"] and states["encode-validation"] == ["Cached"], states
    # The cluster's job table: the flow run's driver, and the query's own.
    assert int(run.jobs.stdout.strip().splitlines()[-1]) >= 2, run.jobs.stderr[-2000:]


def test_the_same_config_run_twice_keeps_the_first_runs_checkpoints_and_versions(ray_address_run):
    out, overrides = ray_address_run.out, ray_address_run.overrides
    assert ray_address_run.state == "COMPLETED"
    client = mlflow_client(out)
    v1 = client.get_model_version("smoke-sft", "1")
    v1_files = tree_digest(Path(v1.source.removeprefix("file://")))

    # New data arrives before the next scheduled run: only the changed file is encoded again.
    with (ray_address_run.data / "train.jsonl").open("a") as f:
        f.write(json.dumps({"instruction": "One more row", "input": "", "output": "Indeed."}) + "\n")
    second = start_run(overrides)
    assert wait_state(second, {"FAILED", "CRASHED", "COMPLETED"}) == "COMPLETED"
    states = task_states(second)
    assert states["encode-train"] == ["Completed"] and states["encode-validation"] == ["Cached"], states

    assert len(run_folders(out)) == 2
    assert tree_digest(Path(v1.source.removeprefix("file://"))) == v1_files
    versions = {int(v.version): v for v in client.search_model_versions("name='smoke-sft'")}
    assert sorted(versions) == [1, 2, 3, 4] and len({v.source for v in versions.values()}) == 4
    assert client.get_model_version("smoke-sft", "1").source == v1.source
    assert {versions[1].run_id, versions[2].run_id} != {versions[3].run_id, versions[4].run_id}
