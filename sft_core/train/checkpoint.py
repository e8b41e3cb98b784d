"""Checkpoint layout and atomic publication.

    <output_dir>/sft_train/checkpoint-<step>/<cluster_name>/   Hugging Face folder (from_pretrained loads it)
    <output_dir>/sft_train/checkpoint-<step>/trainer_state.json

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
    found = sorted(
        root.glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1,
    )
    removed = [p for p in found if p.name.split("-")[1].isdigit()][:-keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
