"""Shared fixtures: an offline environment, a real Prefect server on loopback, tiny models."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DEMO, REPO, save_empty_prefect_database

# Before anything imports Prefect, Ray or transformers.
_SESSION_HOME = Path(os.environ.get("SFT_TEST_HOME", "/tmp/sft-tests")) / f"session-{os.getpid()}"
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    SFT_HOME=str(_SESSION_HOME),
    # Converted models are shared across sessions (the GGUF conversion takes ~25 s).
    SFT_MODEL_CACHE=os.environ.get("SFT_MODEL_CACHE", str(REPO / ".sft" / "models")),
    PREFECT_HOME=str(_SESSION_HOME / "prefect"),
    # fp32 on every CPU, so that the exactness tests (layouts, splits, resume) mean the same on
    # machines with and without native bf16; tests/test_bf16.py sets it per test. SFT_CPU_BF16=1
    # in the environment runs the suite with bf16 autocast, by hand.
    SFT_CPU_BF16=os.environ.get("SFT_CPU_BF16", "0"),
)
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAY_ADDRESS", None)

from flows.runtime import free_port, set_local_defaults, start_server, stop_process_group  # noqa: E402

set_local_defaults()
# Ray token authentication, as a run's own local Ray has it (flows/ray_start.py:own_token), with one
# token for the session: the tests' own clusters and the runs they start then talk to each other.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One real Prefect server for the session; PREFECT_API_URL is exported so Ray workers use it."""
    api_url, proc = start_server(_SESSION_HOME / "prefect", free_port())
    save_empty_prefect_database(_SESSION_HOME / "prefect" / "prefect.db")
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


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


_EXIT_STATUS = pytest.StashKey[int]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """End as `sft` does: atexit handlers, then exit without the interpreter's freeing of every
    module. With Ray's, Prefect's and torch's threads loaded into this process, that freeing once
    segfaulted after every test had passed (a thread called into freed code: dmesg showed the
    instruction pointer on a heap address), and CI read the crash as a failure."""
    from flows.cli import exit_without_teardown

    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:  # the session never ran (e.g. --help): the usual exit
        return
    exit_without_teardown(status)
