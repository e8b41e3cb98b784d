"""Checkpoint layout and atomic publication.

    <output_dir>/sft_train/checkpoint-<step>/<cluster_name>/   Hugging Face folder (from_pretrained loads it)
    <output_dir>/sft_train/checkpoint-<step>/train_state/      exact resume: DCP model + optimizer,
                                                               scheduler and RNG per rank
    <output_dir>/sft_train/checkpoint-<step>/trainer_state.json step, metric history, MLflow run id

Workers write into a hidden `.checkpoint-<step>.tmp` folder; `publish` fsyncs it and renames it into
place, so a checkpoint appears whole or not at all, and a crash mid-save leaves the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / "sft_train" / f"checkpoint-{step}"


def staging_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / "sft_train" / f".checkpoint-{step}.tmp"


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(output_dir: str, step: int, state: dict[str, Any]) -> Path:
    """Write trainer_state.json into the staged checkpoint and rename it into place."""
    staged, final = staging_dir(output_dir, step), checkpoint_dir(output_dir, step)
    (staged / "trainer_state.json").write_text(json.dumps(state, indent=2))
    _fsync_tree(staged)
    if final.exists():  # a rerun into the same output_dir replaces its own checkpoint
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)
    return final


def prune(output_dir: str, keep: int | None) -> list[Path]:
    """Remove all but the newest `keep` checkpoints; returns what was removed."""
    if not keep:
        return []
    root = Path(output_dir) / "sft_train"
    found = sorted((s, p) for p in root.glob("checkpoint-*") if (s := _step_of(p)) is not None)
    removed = [p for _, p in found][:-keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _step_of(path: Path) -> int | None:
    tail = path.name.removeprefix("checkpoint-")
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def latest_checkpoint(output_dir: str) -> Path | None:
    """The newest complete checkpoint (published ones always are: they appear by rename)."""
    root = Path(output_dir) / "sft_train"
    found = [(s, p) for p in root.glob("checkpoint-*") if (s := _step_of(p)) is not None]
    found = [
        (s, p) for s, p in found if (p / "trainer_state.json").is_file() and (p / "train_state").is_dir()
    ]
    return max(found)[1] if found else None


def resolve_resume(setting: bool | str, output_dir: str) -> Path | None:
    """`resume_from_checkpoint`: false -> None; auto -> the latest checkpoint or None; a path ->
    that checkpoint (the checkpoint-N folder or its Hugging Face subfolder)."""
    from sft_core.errors import ConfigError

    if setting in (False, "false", None):
        return None
    if setting == "auto":
        return latest_checkpoint(output_dir)
    path = Path(str(setting))
    if (path / "trainer_state.json").is_file():
        return path
    if (path.parent / "trainer_state.json").is_file():
        return path.parent
    raise ConfigError(
        f"config key 'resume_from_checkpoint': '{setting}' is not a checkpoint folder "
        "(expected <output_dir>/sft_train/checkpoint-<step> with trainer_state.json)."
    )


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "trainer_state.json").read_text())
