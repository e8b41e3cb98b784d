"""What a resume must keep, checked against the checkpoint before any worker starts.

Each check reads the checkpoint's trainer_state.json (and, for checkpoints saved before a value was
recorded there, what its folder shows) and either returns warning lines for changes that take
effect from the resumed step, or raises a ConfigError naming the config key: the data (by content),
the optimizer's pinned hyperparameters, the global batch, the model's shape, the LoRA adapter and
the per-rank state's format and layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sft_core.errors import ConfigError

# The way out every refusal offers: the checkpoint's Hugging Face folder as a new run's pretrained model.
_NEW_RUN = "start a new run (resume_from_checkpoint: false) from its Hugging Face folder (pretrain: <checkpoint>/sft_train)"


def _changes(saved: dict[str, Any], current: dict[str, Any], keys: Iterable[str]) -> list[str]:
    """'<key> <saved> -> <current>' for each of `keys` both hold with different values."""
    return [
        f"{k} {saved[k]} -> {current[k]}"
        for k in keys
        if k in saved and k in current and saved[k] != current[k]
    ]


def _exported(checkpoint: Path, state: dict[str, Any]) -> Path:
    """The checkpoint's Hugging Face folder (a LoRA run's: its adapter)."""
    return checkpoint / state.get("cluster_name", "sft_train")


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
            f"trained with, or {_NEW_RUN} to train with new ones."
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
            f"workers), or {_NEW_RUN}."
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
    saved_config = _exported(checkpoint, state) / "config.json"
    if not saved_config.is_file():
        return
    saved = json.loads(saved_config.read_text())
    current = json.loads((Path(model_dir) / "config.json").read_text())
    if changed := _changes(saved, current, SHAPE_KEYS):
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
    folder = _exported(checkpoint, state)
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
            f"adapters, this config trains {given}. Resume as it was trained, or {_NEW_RUN}."
        )
    if saved is None or lora is None:
        return []
    known_settings = {k: v for k, v in saved.items() if v is not None}  # an older checkpoint's: rank, alpha
    if changed := _changes(known_settings, lora, ADAPTER_KEYS):
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
            f"cannot read. Resume with the strategy it was trained with, or {_NEW_RUN}."
        )
    was, now = saved["layout"], current["layout"]
    if was is not None and now is not None and was != now:
        every = sorted(set(was) | set(now))  # a key only one of them has shows as None on the other side
        changed = _changes(dict.fromkeys(every) | was, dict.fromkeys(every) | now, every)
        raise ConfigError(
            f"config key 'sft_train.strategy_args.strategy_config': the checkpoint at step {step} holds each "
            f"rank's shards of another layout ({', '.join(changed)}). Resume with its layout, or {_NEW_RUN}."
        )
