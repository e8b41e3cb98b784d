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

# Killed after checkpoint-2, resumed for steps 3 and 4: those steps match the uninterrupted run
# only if the optimizer state, the schedule, the data order and the RNG were all restored.
STEPS, SAVE = 4, 2

LORA = "+sft_train.model_args.lora={rank: 4, alpha: 8}"
MEGATRON_DISTRIBUTED_OPTIMIZER = [
    "sft_train.strategy_args.strategy_name=megatron_train",
    "+sft_train.strategy_args.strategy_config.use_distributed_optimizer=true",
]
# (layout, how the run continues after the SIGKILL). "sft run": the run fails (max_restarts=0) and
# `sft run resume_from_checkpoint=auto`, a new process, resumes it in its run folder and MLflow
# run. "restart": the flow restarts its cluster from the run's newest checkpoint by itself
# (max_restarts=1). Both hand the checkpoint to new workers the same way, so each layout's resume
# state is checked through one of them: a run costs about a minute of CI.
CASES = {
    "ddp-resumed-by-sft-run": ([], "sft run"),
    # Only the adapter (and its Adam state) is in the resume state; the base comes from the pretrained folder.
    "ddp-lora-restarted-by-the-flow": ([LORA], "restart"),
    # Decoder layers under torch.compile, inside activation checkpointing: the restarted workers
    # compile the same kernels, load the state into the compiled layers and recompute alike.
    "ddp-compiled-checkpointed-restarted-by-the-flow": (
        ["sft_train.model_args.compile=true", "sft_train.training_args.gradient_checkpointing=true"],
        "restart",
    ),
    # Sharded weights and Adam state; the full weights come back from the checkpoint's HF folder.
    "fsdp2-restarted-by-the-flow": (["sft_train.strategy_args.strategy_name=fsdp2_train"], "restart"),
    # Two data-parallel replicas whose Adam state is sharded between them (megatron's own state).
    "megatron-dp2-distributed-optimizer-restarted-by-the-flow": (MEGATRON_DISTRIBUTED_OPTIMIZER, "restart"),
}


def common(out: Path, data: Path, layout: list[str]) -> list[str]:
    return [
        "run", "+experiment=smoke",
        f"sft_train.training_args.max_steps={STEPS}", f"save_steps={SAVE}", f"eval_steps={SAVE}",
        f"output_dir={out}", f"logging_dir={out}/tb",
        f"sft_train.data_args.file_name={data}/train.jsonl",
        f"validation.data_args.file_name={data}/validation.jsonl",
        *layout,
    ]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_resume_after_sigkill_matches_uninterrupted_run(case, prefect_server, tmp_path, demo_copy):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from sft_core.tracking.mlflow_tracker import source_path

    layout, how = CASES[case]
    reference = run_cli(common(tmp_path / "ref", demo_copy, layout), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "run"
    restarts = 1 if how == "restart" else 0  # 0: this run must fail, and be resumed by hand
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *common(out, demo_copy, layout), f"sft_train.max_restarts={restarts}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(out.glob(f"runs/*/sft_train/checkpoint-{SAVE}/manifest.json")):
        assert proc.poll() is None and time.monotonic() < deadline, f"run ended before checkpoint-{SAVE}"
        time.sleep(0.1)
    pids = worker_pids(proc.pid)
    assert pids, "no SFTWorker process found"
    os.kill(pids[-1], signal.SIGKILL)
    log, _ = proc.communicate(timeout=300)
    if how == "restart":
        assert proc.returncode == 0, log[-3000:]
        assert "restarting the cluster (restart 1 of sft_train.max_restarts=1)" in log, log[-3000:]
    else:
        assert proc.returncode == 1, log[-3000:]
        # One line that names the rank and what to do, not the driver's traceback.
        told = log[log.rindex("sft: error:") :]
        assert "died during" in told and "resume_from_checkpoint=auto" in told and "Traceback" not in told, (
            told
        )
        assert not checkpoint_path(out, STEPS).exists()
        # As a run stopped between saving a checkpoint and registering it leaves it (`sft` killed,
        # a tracking server lost): the resume registers the checkpoint it continues from.
        registry = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow/mlflow.db")
        for v in registry.search_model_versions("name='smoke-sft'"):
            registry.delete_model_version("smoke-sft", v.version)
        resumed = run_cli([*common(out, demo_copy, layout), "resume_from_checkpoint=auto"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resuming from" in resumed.stdout + resumed.stderr
        assert f"checkpoint-{SAVE} was saved but never registered" in resumed.stdout + resumed.stderr
        registered = {
            source_path(v.source).parent.name: v.tags["global_step"]
            for v in registry.search_model_versions("name='smoke-sft'")
        }
        assert registered == {f"checkpoint-{SAVE}": str(SAVE), f"checkpoint-{STEPS}": str(STEPS)}

    weights = "adapter_model.safetensors" if LORA in layout else "model.safetensors"
    final = load_file(str(checkpoint_path(out, STEPS) / "sft_train" / weights))
    expected = load_file(str(checkpoint_path(tmp_path / "ref", STEPS) / "sft_train" / weights))
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
    assert sorted(got) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in got.values()), got
    assert {s: v[0] for s, v in got.items()} == pytest.approx({s: v[0] for s, v in want.items()}, rel=1e-6)
