"""Checkpoint layout, atomic publication and the completeness manifest.

Inside a run folder (run_folder.py):

    sft_train/checkpoint-<step>/<cluster_name>/   Hugging Face folder (from_pretrained loads it; an
                                                  MLmodel beside the weights makes it an MLflow model)
    sft_train/checkpoint-<step>/train_state/      exact resume: DCP optimizer (and a LoRA adapter),
                                                  scheduler and RNG per rank; full weights are read
                                                  back from the Hugging Face folder (fp32, exact)
    sft_train/checkpoint-<step>/trainer_state.json step, metric history, MLflow run id, data fingerprint,
                                                   what a resume must keep (global batch, LoRA, layout)
    sft_train/checkpoint-<step>/manifest.json     every file above with its size

Workers write into the run's hidden `.checkpoint-<step>.tmp` folder; `publish` writes the manifest,
fsyncs and renames it into place, so a checkpoint appears whole or not at all. Resume accepts only a
checkpoint whose manifest lists files that are all there with their sizes. A published checkpoint is
never replaced: registered model versions point at it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_core.errors import ConfigError, StorageError
from sft_core.train.run_folder import RunFolder, claim_for_removal, own_entries, runs_root

MANIFEST = "manifest.json"


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


def _files(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


# Below this much free space a failed write is taken for a full disk: a write that hits ENOSPC has
# filled the disk to its last blocks (torch and safetensors then report only a short write).
FULL_BELOW = 64 << 20


def size_of(checkpoint: Path) -> int:
    """Bytes of a published checkpoint, as its manifest lists them."""
    return sum(json.loads((checkpoint / MANIFEST).read_text())["files"].values())


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def check_room(run: RunFolder, step: int) -> None:
    """Before checkpoint `step` is written: stop, writing nothing, if the disk has less room than the
    run's newest checkpoint took (the next one is as large; older ones go only after it is saved)."""
    newest = latest_in_run(run)
    if newest is None:
        return
    need, free = size_of(newest), shutil.disk_usage(run.checkpoints_root).free
    if free < need:
        raise StorageError(
            f"checkpoint at step {step}: the disk of {run.checkpoints_root} has {_mib(free)} free and the run's "
            f"checkpoints take {_mib(need)} each ({newest.name}). Nothing was written. Free space (or move "
            f"output_dir), then resume_from_checkpoint=auto continues from {newest.name}."
        )


def failed_write(run: RunFolder, step: int) -> StorageError | None:
    """After checkpoint `step` failed to be written, before its partial folder is removed: the
    error to report if the disk is full, else None (the failure is something else)."""
    free = shutil.disk_usage(run.checkpoints_root).free
    if free >= FULL_BELOW:
        return None
    newest = latest_in_run(run)
    then = f"resume_from_checkpoint=auto continues from {newest.name}" if newest else "run it again"
    return StorageError(
        f"checkpoint at step {step}: the disk of {run.checkpoints_root} is full ({_mib(free)} free when "
        f"the write failed). The partial checkpoint was removed. Free space (or move output_dir), then {then}."
    )


def publish(run: RunFolder, step: int, state: dict[str, Any], world_size: int) -> Path:
    """Write trainer_state.json and the manifest into the staged checkpoint and rename it into place."""
    staged, final = run.staging(step), run.checkpoint(step)
    if final.exists():
        raise FileExistsError(f"{final} already exists; a published checkpoint is never replaced")
    rank_files = sorted((staged / "train_state").glob("*rank*.pt"))
    if len(rank_files) != world_size:
        raise RuntimeError(
            f"{staged}: {len(rank_files)} rank state files for {world_size} workers; not publishing it"
        )
    (staged / "trainer_state.json").write_text(json.dumps({**state, "saved_at": time.time()}, indent=2))
    manifest = {"world_size": world_size, "files": _files(staged)}
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_tree(staged)
    staged.rename(final)
    return final


def is_complete(checkpoint: Path) -> bool:
    """Every file its manifest lists is there with its size (a copy or a deletion shows)."""
    try:
        listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    for rel, size in listed.items():
        p = checkpoint / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def step_of(path: Path) -> int | None:
    tail = path.name.removeprefix("checkpoint-")
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def checkpoints_in_run(run: RunFolder, complete_only: bool = True) -> list[Path]:
    """The run's published checkpoints, oldest step first."""
    found = sorted(
        (s, p.resolve())
        for p in own_entries(run.checkpoints_root, "checkpoint-*")
        if (s := step_of(p)) is not None
    )
    return [p for _, p in found if not complete_only or is_complete(p)]


def latest_in_run(run: RunFolder) -> Path | None:
    found = checkpoints_in_run(run)
    return found[-1] if found else None


def latest_checkpoint(output_dir: str) -> Path | None:
    """The most recently saved complete checkpoint of any run in output_dir."""
    candidates = [
        c for folder in own_entries(runs_root(output_dir)) for c in checkpoints_in_run(RunFolder(folder))
    ]
    return max(candidates, key=lambda c: read_state(c).get("saved_at", 0.0), default=None)


def prune(
    run: RunFolder,
    keep: int | None,
    protected: frozenset[Path] | set[Path] = frozenset(),
    forget: Callable[[Path], None] = lambda path: None,
) -> list[Path]:
    """Remove all but the run's newest `keep` checkpoints, never its newest nor a protected one (the
    one the registry's `best` alias points at) nor one another run is starting from (`pinned`). Only this run's folder is touched. `forget(path)`
    runs before each folder goes (the caller deletes its registered versions there): a process
    killed in between leaves a folder no version names, which the next prune removes, never a
    version naming a folder that is gone. Returns what was removed."""
    if not keep:
        return []
    found = checkpoints_in_run(run, complete_only=False)
    keep_too = {p.resolve() for p in protected}
    removed = []
    for p in found[:-keep]:
        if p in keep_too:
            continue
        with claim_for_removal(p) as claimed:
            if not claimed:  # another run is starting from it: a later prune takes it
                continue
            forget(p)
            shutil.rmtree(p)
            removed.append(p)
    return removed


def resolve_resume(setting: bool | str, output_dir: str) -> Path | None:
    """`resume_from_checkpoint`: false -> None; auto -> the newest complete checkpoint or None; a path
    -> that checkpoint (the checkpoint-N folder or its Hugging Face subfolder), which must be complete."""
    if setting in (False, "false", None):
        return None
    if setting == "auto":
        return latest_checkpoint(output_dir)
    path = Path(str(setting)).expanduser()
    if not (path / "trainer_state.json").is_file() and (path.parent / "trainer_state.json").is_file():
        path = path.parent
    if not path.exists():
        raise ConfigError(
            f"config key 'resume_from_checkpoint': '{setting}' does not exist (a typo, or a checkpoint its "
            "run removed since: max_ckpt_to_keep, whose log names what it removed)."
        )
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(
            f"config key 'resume_from_checkpoint': '{setting}' is not a checkpoint folder (expected "
            "<output_dir>/runs/<run>/sft_train/checkpoint-<step> with trainer_state.json)."
        )
    # A checkpoint from before manifests (no manifest.json) is taken as given when named by path.
    if (path / MANIFEST).exists() and not is_complete(path):
        raise ConfigError(
            f"config key 'resume_from_checkpoint': '{path}' is incomplete (files listed in its "
            f"{MANIFEST} are missing or have another size); choose another checkpoint."
        )
    return path.resolve()


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "trainer_state.json").read_text())
