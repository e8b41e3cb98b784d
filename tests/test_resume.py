"""Exact resume: a run whose worker is SIGKILLed mid-training, resumed from its last checkpoint,
ends with the same weights and the same metric history as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import checkpoint_path, run_cli, worker_pids

pytestmark = pytest.mark.slow


LAYOUTS = {
    "ddp": [],
    # Only the adapter (and its Adam state) is in the resume state; the base comes from the pretrained folder.
    "ddp-lora": ["+sft_train.model_args.lora={rank: 4, alpha: 8}"],
    # Two data-parallel replicas whose Adam state is sharded between them (megatron's own state).
    "megatron-dp2-distributed-optimizer": [
        "sft_train.strategy_args.strategy_name=megatron_train",
        "+sft_train.strategy_args.strategy_config.use_distributed_optimizer=true",
    ],
}


def common(out: Path, data: Path, layout: list[str]) -> list[str]:
    return [
        "run", "+experiment=smoke",
        "sft_train.training_args.max_steps=8", "save_steps=4", "eval_steps=4",
        f"output_dir={out}", f"logging_dir={out}/tb",
        f"sft_train.data_args.file_name={data}/train.jsonl",
        f"validation.data_args.file_name={data}/validation.jsonl",
        *layout,
    ]  # fmt: skip


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_after_sigkill_matches_uninterrupted_run(layout, prefect_server, tmp_path, demo_copy):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    reference = run_cli(common(tmp_path / "ref", demo_copy, LAYOUTS[layout]), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "run"
    proc = subprocess.Popen(  # no automatic restart: this run must fail, and be resumed by hand
        [sys.executable, "-m", "flows.cli", *common(out, demo_copy, LAYOUTS[layout]), "sft_train.max_restarts=0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(out.glob("runs/*/sft_train/checkpoint-4/manifest.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before checkpoint-4"
        time.sleep(0.1)
    pids = worker_pids(proc.pid)
    assert pids, "no SFTWorker process found"
    os.kill(pids[-1], signal.SIGKILL)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, log[-3000:]
    assert not checkpoint_path(out, 8).exists()

    resumed = run_cli([*common(out, demo_copy, LAYOUTS[layout]), "resume_from_checkpoint=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    weights = "adapter_model.safetensors" if "lora" in layout else "model.safetensors"
    final = load_file(str(checkpoint_path(out, 8) / "sft_train" / weights))
    expected = load_file(str(checkpoint_path(tmp_path / "ref", 8) / "sft_train" / weights))
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert (final[key] - value).abs().max() <= 1e-6, key

    # One MLflow run, continued: every step's loss logged once, equal to the uninterrupted run's.
    def losses(root: Path) -> dict[int, list[float]]:
        client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("smoke-sft").experiment_id])
        assert len(runs) == 1
        history: dict[int, list[float]] = {}
        for m in client.get_metric_history(runs[0].info.run_id, "sft_train/loss"):
            history.setdefault(m.step, []).append(m.value)
        return history

    got, want = losses(out), losses(tmp_path / "ref")
    assert sorted(got) == list(range(1, 9)) and all(len(v) == 1 for v in got.values()), got
    assert {s: v[0] for s, v in got.items()} == pytest.approx({s: v[0] for s, v in want.items()}, rel=1e-6)
