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
from sft_core.train.run_folder import RunFolder, runs_root

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
        (s, p.resolve()) for p in run.checkpoints_root.glob("checkpoint-*") if (s := step_of(p)) is not None
    )
    return [p for _, p in found if not complete_only or is_complete(p)]


def latest_in_run(run: RunFolder) -> Path | None:
    found = checkpoints_in_run(run)
    return found[-1] if found else None


def latest_checkpoint(output_dir: str) -> Path | None:
    """The most recently saved complete checkpoint of any run in output_dir."""
    runs = runs_root(output_dir)
    candidates = [
        c for folder in runs.glob("*") if folder.is_dir() for c in checkpoints_in_run(RunFolder(folder))
    ]
    return max(candidates, key=lambda c: read_state(c).get("saved_at", 0.0), default=None)


def prune(
    run: RunFolder,
    keep: int | None,
    protected: frozenset[Path] | set[Path] = frozenset(),
    forget: Callable[[Path], None] = lambda path: None,
) -> list[Path]:
    """Remove all but the run's newest `keep` checkpoints, never its newest nor a protected one (the
    one the registry's `best` alias points at). Only this run's folder is touched. `forget(path)`
    runs before each folder goes (the caller deletes its registered versions there): a process
    killed in between leaves a folder no version names, which the next prune removes, never a
    version naming a folder that is gone. Returns what was removed."""
    if not keep:
        return []
    found = checkpoints_in_run(run, complete_only=False)
    keep_too = {p.resolve() for p in protected}
    removed = [p for p in found[:-keep] if p not in keep_too]
    for p in removed:
        forget(p)
        shutil.rmtree(p)
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


def check_data_fingerprint(
    state: dict[str, Any], fingerprint: str, policy: str, legacy: Callable[[], str] | None = None
) -> str | None:
    """Resume over other data than the checkpoint was trained on: refuse (policy 'error') or return a
    warning to log (policy 'warn'). None when they match or the checkpoint predates fingerprints.

    A checkpoint saved before the fingerprint was taken by content (no `data_fingerprint_by`) holds
    one that covers the pipeline's data code too: it is compared with `legacy()`, and a difference
    may be a code update alone, which the message says."""
    saved = state.get("data_fingerprint")
    by_content = state.get("data_fingerprint_by") == "content"
    current = fingerprint if by_content or legacy is None else legacy()
    if saved is None or saved == current:
        return None
    what = "a data file, the template or an encoding setting changed" + (
        ""
        if by_content
        else ", or only the pipeline's code: this checkpoint was saved by an earlier "
        "version, whose fingerprint covered its code too"
    )
    message = (
        f"the data differs from what the checkpoint at step {state.get('global_step')} was trained on "
        f"(data fingerprint {saved[:12]} -> {current[:12]}: {what})"
    )
    if policy == "error":
        raise ConfigError(
            f"config key 'resume_data_check': {message}. Start a new run (resume_from_checkpoint: false), "
            "or set resume_data_check: warn to continue on the new data."
        )
    return message


# What the resume state fixes: Adam's hyperparameters and the base learning rate live in the saved
# optimizer and scheduler, so a new value in the config would be silently ignored on resume.
RESUME_PINNED = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon")


def check_training_args(state: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Resume with other training arguments than the checkpoint was trained with: refused for those
    the resume state fixes (RESUME_PINNED), one warning line per other change (they take effect from
    the resumed step: a schedule, a batch size). Nothing for a checkpoint that predates the record."""
    saved = state.get("training_args")
    if not saved:
        return []
    changed = {k: (saved[k], current[k]) for k in current if k in saved and saved[k] != current[k]}
    pinned = {k: v for k, v in changed.items() if k in RESUME_PINNED}
    if pinned:
        listed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in pinned.items())
        raise ConfigError(
            f"config key 'sft_train.training_args': resuming the checkpoint at step {state.get('global_step')} "
            f"with {listed}, which its saved optimizer state would override. Resume with the values it was "
            "trained with, or start a new run (resume_from_checkpoint: false) from its Hugging Face folder "
            "(pretrain: <checkpoint>/sft_train) to train with new ones."
        )
    return [
        f"sft_train.training_args.{k} changed from {old} to {new} since the checkpoint at step "
        f"{state.get('global_step')}; it applies from there on"
        for k, (old, new) in changed.items()
    ]


def saved_global_batch(checkpoint: Path, state: dict[str, Any]) -> int | None:
    """The global batch (rows per optimizer step) the checkpoint was trained with: recorded, or for
    a ddp/fsdp2 checkpoint saved before it was, per-device batch x accumulation x its rank files."""
    if "global_batch_size" in state:
        return int(state["global_batch_size"])
    args = state.get("training_args") or {}
    ranks = len(list((checkpoint / "train_state").glob("rank*.pt")))
    if not ranks or "per_device_train_batch_size" not in args:
        return None  # megatron's rank files do not say its data-parallel size
    return int(args["per_device_train_batch_size"]) * int(args.get("gradient_accumulation_steps", 1)) * ranks


def check_global_batch(checkpoint: Path, state: dict[str, Any], current: int, how: str) -> None:
    """A resume must keep the global batch: the epoch's order is cut into global batches and the
    resume continues at the checkpoint's step, so another size would train some rows of the epoch
    again and skip others. `how` says how the current size comes about."""
    saved = saved_global_batch(checkpoint, state)
    if saved is not None and saved != current:
        raise ConfigError(
            f"config key 'sft_train': the checkpoint at step {state.get('global_step')} was trained with a "
            f"global batch of {saved} rows a step, this config gives {current} ({how}). The data position "
            "of a resume counts global batches, so another size would train some rows again and skip "
            "others. Resume with the same product (e.g. more gradient_accumulation_steps for fewer "
            "workers), or start a new run (resume_from_checkpoint: false) from its Hugging Face folder "
            "(pretrain: <checkpoint>/sft_train)."
        )


# Config keys that fix a model's weight shapes: a resume loads the checkpoint's weights into the
# model `pretrain` builds, so any difference fails deep inside the load.
SHAPE_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
)  # fmt: skip


def check_same_model(checkpoint: Path, state: dict[str, Any], model_dir: str, pretrain: str) -> None:
    """Refuse to resume a checkpoint into a model of another shape than it was trained from. A LoRA
    checkpoint holds its adapter (no config.json): its base is pretrain's folder, as in training."""
    saved_config = checkpoint / state.get("cluster_name", "sft_train") / "config.json"
    if not saved_config.is_file():
        return
    saved = json.loads(saved_config.read_text())
    current = json.loads((Path(model_dir) / "config.json").read_text())
    changed = [
        f"{k} {saved[k]} -> {current[k]}"
        for k in SHAPE_KEYS
        if k in saved and k in current and saved[k] != current[k]
    ]
    if changed:
        raise ConfigError(
            f"config key 'pretrain': the checkpoint at step {state.get('global_step')} was trained from a model "
            f"of another shape than '{pretrain}' ({', '.join(changed)}). Resume with the pretrain it was "
            "trained from, or start a new run (resume_from_checkpoint: false)."
        )


# LoRA settings that decide what the saved adapter is: another value would load it into other
# adapters (shapes, scale, modules), or drop part of it unseen.
ADAPTER_KEYS = ("rank", "alpha", "target_modules")


def saved_lora(checkpoint: Path, state: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """(known, the checkpoint's LoRA settings or None for full fine-tuning): recorded, or read from
    the folder of a checkpoint saved before they were (its adapter_config.json, or a full model)."""
    if "lora" in state:
        return True, state["lora"]
    folder = checkpoint / state.get("cluster_name", "sft_train")
    if (folder / "adapter_config.json").is_file():
        adapter = json.loads((folder / "adapter_config.json").read_text())
        return True, {"rank": adapter.get("r"), "alpha": adapter.get("lora_alpha"), "target_modules": None}
    return (folder / "config.json").is_file(), None


def check_same_adapter(checkpoint: Path, state: dict[str, Any], lora: dict[str, Any] | None) -> list[str]:
    """Refuse to resume with LoRA switched on or off, or another rank, alpha or target_modules than
    the checkpoint's adapter; one warning line per other LoRA change (dropout, merge_at_end)."""
    known, saved = saved_lora(checkpoint, state)
    step = state.get("global_step")
    if not known:
        return []
    if (saved is None) != (lora is None):
        trained, given = ("with", "without") if saved else ("without", "with")
        raise ConfigError(
            f"config key 'sft_train.model_args.lora': the checkpoint at step {step} was trained {trained} LoRA "
            f"adapters, this config trains {given}. Resume as it was trained, or start a new run "
            "(resume_from_checkpoint: false) from its Hugging Face folder."
        )
    if saved is None or lora is None:
        return []
    changed = [
        f"{k} {saved[k]} -> {lora[k]}"
        for k in ADAPTER_KEYS
        if saved.get(k) is not None and saved[k] != lora[k]
    ]
    if changed:
        raise ConfigError(
            f"config key 'sft_train.model_args.lora': the checkpoint at step {step} saved adapters with other "
            f"settings ({', '.join(changed)}): resumed, they would be loaded into other adapters or partly "
            "dropped. Resume with its settings, or start a new run (resume_from_checkpoint: false)."
        )
    return [
        f"sft_train.model_args.lora.{k} changed from {saved[k]} to {lora[k]} since the checkpoint at step {step}"
        for k in lora
        if k not in ADAPTER_KEYS and k in saved and saved[k] != lora[k]
    ]


def check_same_layout(checkpoint: Path, state: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose strategy cannot read the checkpoint's per-rank state: another state
    format (megatron_train's against the torch strategies', which DCP reshards between them), or
    another layout where the format is sharded by it (`current`: parallel_layout's record)."""
    step = state.get("global_step")
    saved = state.get("parallel")
    if saved is None:  # saved before it was recorded: the rank files tell the format
        megatron = any((checkpoint / "train_state").glob("megatron_rank*.pt"))
        saved = {
            "strategy_name": "an earlier run",
            "state_format": "megatron" if megatron else "dcp",
            "layout": None,
        }
    if saved["state_format"] != current["state_format"]:
        raise ConfigError(
            f"config key 'sft_train.strategy_args.strategy_name': the checkpoint at step {step} was saved by "
            f"{saved['strategy_name']} ({saved['state_format']} resume state), which {current['strategy_name']} "
            "cannot read. Resume with the strategy it was trained with, or start a new run "
            "(resume_from_checkpoint: false) from its Hugging Face folder (pretrain: <checkpoint>/sft_train)."
        )
    was, now = saved["layout"], current["layout"]
    if was is not None and now is not None and was != now:
        changed = [
            f"{k} {was.get(k)} -> {now.get(k)}"
            for k in sorted(set(was) | set(now))
            if was.get(k) != now.get(k)
        ]
        raise ConfigError(
            f"config key 'sft_train.strategy_args.strategy_config': the checkpoint at step {step} holds each "
            f"rank's shards of another layout ({', '.join(changed)}). Resume with its layout, or start a new "
            "run (resume_from_checkpoint: false) from its Hugging Face folder (pretrain: <checkpoint>/sft_train)."
        )
