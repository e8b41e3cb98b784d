"""prefect.yaml works as written: deploy, a process worker, `prefect deployment run` to completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.runtime import stop_process_group
from tests.helpers import REPO, checkpoint_path

pytestmark = pytest.mark.slow


def prefect(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PWD": str(REPO)}  # prefect.yaml's pull step records the deploy directory
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_smoke_deployment_runs_through_a_process_worker(prefect_server, tmp_path: Path):
    assert prefect("work-pool", "create", "sft-local", "--type", "process").returncode == 0
    assert (
        prefect("work-pool", "set-concurrency-limit", "sft-local", "1").returncode == 0
    )  # as prefect.yaml says
    deployed = prefect("--no-prompt", "deploy", "--all")
    assert deployed.returncode == 0, deployed.stdout[-2000:] + deployed.stderr[-2000:]
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("sft-pipeline/nightly-retrain")
        assert client.read_work_pool("sft-local").concurrency_limit == 1
    # Two nights never train at once: the later run waits.
    assert nightly.global_concurrency_limit is not None and nightly.global_concurrency_limit.limit == 1
    assert (
        nightly.concurrency_options is not None
        and nightly.concurrency_options.collision_strategy == "ENQUEUE"
    )
    assert not nightly.schedules[0].active
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "sft-local"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        out = tmp_path / "out"
        overrides = [
            "+experiment=smoke",
            f"output_dir={out}",
            f"logging_dir={out}/tb",
            "sft_train.training_args.max_steps=3",
        ]
        run = prefect("deployment", "run", "sft-pipeline/smoke", "--param", f"overrides={json.dumps(overrides)}",
                      "--watch", timeout=500)  # fmt: skip
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
        assert (checkpoint_path(out, 3) / "sft_train" / "model.safetensors").is_file()
    finally:
        stop_process_group(worker.pid)
