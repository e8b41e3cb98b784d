"""Shared fixtures: an offline environment, a real Prefect server on loopback, tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"

# Before anything imports Prefect, Ray or transformers.
_SESSION_HOME = Path(os.environ.get("SFT_TEST_HOME", "/tmp/sft-tests")) / f"session-{os.getpid()}"
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    SFT_HOME=str(_SESSION_HOME),
    # Converted models are shared across sessions (the GGUF conversion takes ~25 s).
    SFT_MODEL_CACHE=os.environ.get("SFT_MODEL_CACHE", str(REPO / ".sft" / "models")),
    PREFECT_HOME=str(_SESSION_HOME / "prefect"),
)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

from flows.runtime import free_port, set_local_defaults, start_server, stop_process_group  # noqa: E402

set_local_defaults()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One real Prefect server for the session; PREFECT_API_URL is exported so Ray workers use it."""
    api_url, proc = start_server(_SESSION_HOME / "prefect", free_port())
    os.environ["PREFECT_API_URL"] = api_url
    yield api_url
    os.environ.pop("PREFECT_API_URL", None)
    stop_process_group(proc.pid)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama with the real SmolLM2 tokenizer, saved with save_pretrained."""
    from sft_core.model.resolve import resolve_pretrained

    return resolve_pretrained("embedded:tiny-smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer(tiny_model_dir: Path):
    from sft_core.model.resolve import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    """A private copy of the demo data, so a test may change it."""
    out = tmp_path / "data"
    shutil.copytree(DEMO, out)
    return out


def encoded_demo(out: Path, tokenizer, model_dir: Path, *, packing: bool) -> dict[str, str]:
    """The demo train split encoded (native template, 256 tokens) and planned into rows: the
    artifacts a training Cluster takes, for tests that drive the workers without the flow."""
    from sft_core.data.encode import encode_files
    from sft_core.data.messages import FieldMapping
    from sft_core.data.packing import plan_rows
    from sft_core.data.spec import EncodeSpec

    spec = EncodeSpec(256, fields=FieldMapping(query_key="input", system_key="system"))
    data, _ = encode_files([str(DEMO / "train.jsonl")], tokenizer, spec)
    data.save(out / "train.npz")
    (out / "plan.json").write_text(json.dumps(plan_rows(data, 256, packing=packing).to_dict()))
    return {
        "model_dir": str(model_dir),
        "tokenizer_dir": str(model_dir),
        "train_encoded": str(out / "train.npz"),
        "train_plan": str(out / "plan.json"),
    }


def train_on_cluster(cfg, artifacts: dict, steps: int) -> tuple[dict, list[float], list[float]]:
    """Train `steps` steps on real Ray actors; rank 0's final weights, the per-token loss and the
    grad norm of each step."""
    from sft_core.cluster.cluster import Cluster

    cluster = Cluster(cfg, artifacts)
    try:
        cluster.execute_all("initialize")
        results = [cluster.execute_all("train_step", s) for s in range(steps)]
        for step in results:  # each supervised token counted exactly once over the ranks
            assert sum(r["targets"] for r in step) == step[0]["num_targets"]
        losses = [sum(r["loss_sum"] for r in step) / step[0]["num_targets"] for step in results]
        return cluster.execute_all("state_dict")[0], losses, [s[0]["grad_norm"] for s in results]
    finally:
        cluster.shutdown()


def run_cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        # A run writes MLflow under its output_dir unless the caller says otherwise.
        env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **(env or {})},
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


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
