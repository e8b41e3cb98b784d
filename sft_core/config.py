"""Typed, strict configuration.

The YAML keys keep the names of the seed design (ROLL's SFT pipeline), so a config written for it
loads here with the same meaning. Validation is strict: an unknown or misspelled key, a wrong type
or an impossible value stops with a message naming the key, e.g.::

    config key 'sft_train.training_args.learning_rat': unknown key (did you mean 'learning_rate'?)
"""

from __future__ import annotations

import ast
import difflib
import glob
import os
import posixpath
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from sft_core.errors import ConfigError
from sft_core.model.source import pretrain_kind
from sft_core.strategies.config_schema import StrategyConfig
from sft_core.strategies.registry import ARGS, DEFAULT_STRATEGY, DDPArgs, StrategyArgs, known_strategy_name
from sft_core.strict import StrictModel
from sft_core.train.metrics import SUMMARY_PREFIX, TRAIN_SUMMARY, VAL_SUMMARY

UNSUPPORTED_TRACKERS = {
    "wandb": "Weights & Biases is not supported (no hub access, and MLflow is the registry here)",
    "swanlab": "SwanLab is not supported",
    "stdout": "stdout tracking is always on",
}
# MLflow's validator takes 500, but its database schema keeps a run's name in 250 characters (Postgres
# and MySQL enforce it; sqlite does not) and ours is '<exp_name>-<run folder>' (up to ~30 more).
_MAX_EXP_NAME = 200


class LoraArgs(StrictModel):
    """Low-rank adapters (the peft library) on linear layers; the base model's weights stay frozen.
    Checkpoints hold the adapter (loadable with from_pretrained while the base model's folder
    exists); `merge_at_end` also writes the merged full model beside the final one."""

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Module names (e.g. [q_proj, v_proj]) or every linear layer but the output head.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_at_end: bool = True


class ModelArgs(StrictModel):
    # Seed name. bf16/fp16 = autocast with fp32 weights and optimizer. On CPU, bf16 autocast where the
    # CPU multiplies bf16 natively (AVX512_BF16/AMX); elsewhere fp32, and the run log says so.
    dtype: Literal["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"] = "fp32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    lora: LoraArgs | None = None  # null: full fine-tuning
    # torch.compile each decoder layer and the loss (ddp_train, fsdp2_train): fuses the elementwise
    # work between the matmuls (norms, rotary, SwiGLU, autocast's casts, the fp32 log-softmax) and
    # cuts the kernel launches. For GPUs; on a CPU it adds compile time and no speed
    # (docs/benchmarks.md). The first step and the first validation wait for it.
    compile: bool = False


class TrainingArgs(StrictModel):
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="optimizer steps; -1 means run num_train_epochs")
    learning_rate: float = Field(1e-5, gt=0)
    per_device_train_batch_size: int = Field(1, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    # Accepted for seed compatibility: batches are built from in-memory packed arrays, no DataLoader.
    dataloader_num_workers: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    # Warmup step s (0-based) trains at lr * (s + 1) / warmup: no step at lr 0, where Hugging Face's
    # schedules start at 0 and reach the peak a step later. Every type warms up (HF's "constant"
    # ignores warmup; here it is the same as "constant_with_warmup").
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _steps(self) -> TrainingArgs:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                "max_steps must be a positive number of optimizer steps, or -1 to use num_train_epochs"
            )
        return self


class DataArgs(StrictModel):
    file_name: str | list[str] | None = None
    template: str | None = None
    preprocessing_num_workers: int = Field(1, gt=0)
    # Row shape: alpaca (the *_key field mapping), messages ({role, content}), sharegpt
    # (conversations with {from, value}), or auto (decided per row by which fields it has).
    format: Literal["auto", "alpaca", "messages", "sharegpt"] = "auto"
    # Samples longer than sequence_length: cut the response (counted and reported), drop the oldest
    # exchanges of a conversation until it fits (then cut), drop them, or stop.
    length_policy: Literal["truncate", "drop_oldest_turns", "drop", "error"] = "truncate"
    # With truncate: end the cut answer with the end-of-turn token (supervised), so the model still
    # learns to stop; off by default, since it teaches a stop in mid-answer. A cut answer left one
    # token is trained as context only where an earlier answer of the sample is trained, else refused.
    truncate_keep_end_token: bool = False
    # A row that cannot be used: stop naming file, row and field, or skip it into a rejects file.
    on_bad_row: Literal["error", "skip"] = "error"
    # Which answers are trained: every assistant turn of a row in one sample, the last one only, or
    # each in a sample of its own (the conversation up to it, rendered as inference renders it: for
    # templates that show history otherwise than the newest turn, e.g. Qwen3 dropping old reasoning).
    supervise: Literal["all_assistant_turns", "last_assistant_turn", "each_assistant_turn_as_sample"] = (
        "all_assistant_turns"
    )
    # An empty <think></think> block (Qwen3's non-thinking format) teaches only the format: masked
    # unless this asks for it.
    supervise_empty_think: bool = False

    def files(self) -> list[str]:
        if self.file_name is None:
            return []
        return [self.file_name] if isinstance(self.file_name, str) else list(self.file_name)


class WorkerConfig(StrictModel):
    """The seed's `sft_train` block: one cluster of training workers."""

    name: str = "sft_train"
    model_args: ModelArgs = Field(default_factory=ModelArgs)
    training_args: TrainingArgs = Field(default_factory=TrainingArgs)
    data_args: DataArgs = Field(default_factory=DataArgs)
    # strategy_name picks the strategy and the schema its strategy_config is checked by (registry.py).
    strategy_args: StrategyArgs = Field(default_factory=DDPArgs)
    device_mapping: list[int] = Field(default_factory=lambda: [0])
    infer_batch_size: int = Field(1, gt=0)
    use_sequence_packing: bool = True
    # Peak dense TFLOP/s of one device, the denominator of MFU (e.g. 989 for an H100 in bf16).
    # Unset: measured once per worker with a matmul at start-up.
    peak_tflops: float | None = Field(None, gt=0)
    # Every call on the workers (a step, a validation, a checkpoint) and every collective must finish
    # within this many seconds; a frozen or deadlocked worker then fails the step naming its rank.
    worker_timeout_s: float = Field(300.0, gt=0)
    # After a worker dies or stops responding, restart the cluster from the run's newest checkpoint
    # this many times (0: fail the flow run; a Prefect retry of it also continues from there).
    max_restarts: int = Field(1, ge=0)
    # Ray placement of the workers (one bundle per device_mapping entry): pack fills a node before
    # the next; spread puts each on another node where it can.
    placement: Literal["pack", "spread"] = "pack"
    # Each worker keeps the host memory it frees for reuse (glibc), instead of mapping fresh pages
    # for every large block: no page faults per step (1.04-1.6x faster CPU steps measured); RSS stays
    # near its peak.
    keep_host_memory: bool = True

    @field_validator("strategy_args", mode="before")
    @classmethod
    def _strategy_name(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = {"strategy_name": DEFAULT_STRATEGY, **value}
            known_strategy_name(value["strategy_name"])
        return value

    @field_validator("device_mapping", mode="before")
    @classmethod
    def _parse_mapping(cls, value: Any) -> list[int]:
        return parse_device_mapping(value)

    @property
    def world_size(self) -> int:
        return len(self.device_mapping)


class ValidationConfig(StrictModel):
    data_args: DataArgs = Field(default_factory=DataArgs)


class SFTConfig(StrictModel):
    exp_name: str = "sft"
    seed: int = Field(42, ge=0)  # numpy's generators take no negative seed
    logging_dir: str = "./output/logs"
    output_dir: str = "./output"
    system_envs: dict[str, str] = Field(default_factory=dict)
    track_with: str = "mlflow"
    tracker_kwargs: dict[str, Any] = Field(default_factory=dict)
    num_gpus_per_node: int | None = Field(None, gt=0)
    # Join an existing (multi-node) Ray cluster, e.g. "10.0.0.1:6379"; RAY_ADDRESS in the environment
    # does the same. Unset: a local Ray is started on loopback.
    ray_address: str | None = None

    save_steps: int = Field(100, gt=0)
    logging_steps: int = Field(1, gt=0)
    eval_steps: int = Field(10, gt=0)
    eval_at_start: bool = True
    resume_from_checkpoint: bool | str = False
    max_ckpt_to_keep: int | None = Field(None, gt=0)
    # Resuming over data that differs from the checkpoint's (files, template, encoding settings):
    # error refuses, warn continues and logs it.
    resume_data_check: Literal["error", "warn"] = "error"
    # The registry's `best` alias moves to a new version only when this metric (a key of the
    # version's tags: val_loss, loss, ...: metrics.py's TRAIN_SUMMARY and VAL_SUMMARY) improves on the
    # version it points at, across runs. Unset without a validation split: loss.
    metric_for_best_model: str = "val_loss"
    greater_is_better: bool = False

    sequence_length: int = Field(2048, gt=8)
    pretrain: str

    system_key: str | None = None
    prompt_key: str = "instruction"
    query_key: str | None = None
    response_key: str = "output"
    global_template: str | None = None

    sft_train: WorkerConfig = Field(default_factory=WorkerConfig)
    validation: ValidationConfig | None = None
    # Hydra's own block (run dir, output_subdir) means nothing here: there is no Hydra job dir.
    hydra: dict[str, Any] | None = None

    @field_validator("tracker_kwargs")
    @classmethod
    def _tracker_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # Free-form in the seed (wandb's project, notes...): here only log_dir is read, so any other
        # key (a typo of it, or a setting of a tracker not used) would be dropped unseen.
        if unread := sorted(set(kwargs) - {"log_dir"}):
            raise ValueError(
                f"{unread} not read: tracker_kwargs takes log_dir (the TensorBoard folder); MLflow's "
                "server is set by MLFLOW_TRACKING_URI in the environment"
            )
        return kwargs

    @field_validator("track_with")
    @classmethod
    def _tracker(cls, name: str) -> str:
        if name in ("mlflow", "tensorboard"):
            return name
        why = UNSUPPORTED_TRACKERS.get(name, f"unknown tracker '{name}'")
        raise ValueError(
            f"{why}. Use track_with: mlflow (or tensorboard); every run logs to MLflow and "
            "TensorBoard, so tracker_kwargs.log_dir sets the TensorBoard folder."
        )

    @field_validator("exp_name")
    @classmethod
    def _registry_name(cls, name: str) -> str:
        # It names the MLflow experiment and registered model: the registry refuses '/' and ':' and a
        # name that is not its own path component ('.', '..', '..x': MLflow's path_not_unique), and
        # the registry's search filters (pruning) can quote a name holding ' or " but not one holding both.
        if len(name) > _MAX_EXP_NAME:
            raise ValueError(
                f"{len(name)} characters, more than {_MAX_EXP_NAME} (the MLflow run is named "
                "'<exp_name>-<run folder>', and a database-backed MLflow keeps 250 characters of it)"
            )
        norm = posixpath.normpath(name)
        path_like = norm != name or norm == "." or norm.startswith(("..", "/"))
        if not name.strip() or re.search(r"[/:%]", name) or ("'" in name and '"' in name) or path_like:
            raise ValueError(
                f"'{name}' cannot name an MLflow registered model (no '/', ':' or '%', not both ' and \", "
                "not '.' or starting with '..', not empty); use letters, digits, '-', '_' or '.'"
            )
        return name

    @field_validator("metric_for_best_model")
    @classmethod
    def _best_metric(cls, name: str) -> str:
        # Versions are tagged with the short names; the MLflow UI's sft_train/val_loss is val_loss.
        short = name.removeprefix(SUMMARY_PREFIX)
        if short in TRAIN_SUMMARY + VAL_SUMMARY:
            return short
        close = difflib.get_close_matches(short, TRAIN_SUMMARY + VAL_SUMMARY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"'{name}' is not a metric a checkpoint is tagged with{hint}; use one of "
            f"{', '.join(TRAIN_SUMMARY + VAL_SUMMARY)}"
        )

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _resume(cls, value: bool | str) -> bool | str:
        if value is True:
            return "auto"
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> SFTConfig:
        from sft_core.data.templates import BUILTIN_TEMPLATES

        for split in ("train", "validation"):
            name = self.template_for(split)
            if name not in ("native", *BUILTIN_TEMPLATES) and not name.endswith(".jinja"):
                where = "sft_train" if split == "train" else "validation"
                raise ValueError(
                    f"global_template / {where}.data_args.template: unknown template '{name}'; use "
                    f"native, one of {', '.join(BUILTIN_TEMPLATES)}, or a path to a .jinja file"
                )
        if not self.sft_train.data_args.files():
            raise ValueError("sft_train.data_args.file_name: at least one training data file is required")
        if self.num_gpus_per_node is not None:
            too_big = [d for d in self.sft_train.device_mapping if d >= self.num_gpus_per_node]
            if too_big and _gpu_count() > 0:
                raise ValueError(
                    f"sft_train.device_mapping: device ids {too_big} are not below num_gpus_per_node={self.num_gpus_per_node}"
                )
        strategy = self.sft_train.strategy_args
        if self.sft_train.model_args.lora and not strategy.supports_lora:
            with_lora = ", ".join(a.name() for a in ARGS if a.supports_lora)
            raise ValueError(
                f"sft_train.model_args.lora: LoRA is not supported with {strategy.strategy_name} yet; "
                f"use {with_lora}, or drop the lora block for full fine-tuning"
            )
        if self.sft_train.model_args.compile and not strategy.supports_compile:
            with_compile = ", ".join(a.name() for a in ARGS if a.supports_compile)
            raise ValueError(
                f"sft_train.model_args.compile: not supported with {strategy.strategy_name} (megatron-core "
                f"brings its own fused kernels); use {with_compile}, or set it to false"
            )
        if problem := strategy.strategy_config.world_problem(self.sft_train.world_size):
            raise ValueError(f"sft_train.device_mapping: {problem}")
        if self.metric_for_best_model in VAL_SUMMARY and not self.validation_files:
            if "metric_for_best_model" not in self.model_fields_set:
                self.metric_for_best_model = "loss"  # the default, where nothing is validated
            else:
                raise ValueError(
                    f"metric_for_best_model: '{self.metric_for_best_model}' is measured on the validation "
                    "split and this config has none (validation is null or names no file), so `best` "
                    "would never move; set metric_for_best_model=loss, or give validation.data_args.file_name"
                )
        return self

    @property
    def template(self) -> str:
        return self.template_for("train")

    def template_for(self, split: str) -> str:
        """`global_template` wins over the split's `data_args.template`, as in the seed."""
        return self.global_template or self.data_args_for(split).template or "native"

    def data_args_for(self, split: str) -> DataArgs:
        """A split's data settings: validation takes training's, except the keys it sets itself
        (e.g. `validation.data_args.on_bad_row: skip` with a strict training split)."""
        train = self.sft_train.data_args
        if split == "train" or self.validation is None:
            return train
        own = self.validation.data_args
        return train.model_copy(update={k: getattr(own, k) for k in own.model_fields_set if k != "file_name"})

    @property
    def validation_files(self) -> list[str]:
        return self.validation.data_args.files() if self.validation else []

    @property
    def strategy_config(self) -> StrategyConfig:
        """The strategy's own settings, checked by its schema (e.g. megatron's parallel layout)."""
        return self.sft_train.strategy_args.strategy_config

    @property
    def data_parallel_size(self) -> int:
        """Model replicas: every worker for ddp/fsdp2; world / (TP x PP x CP) for megatron."""
        return self.sft_train.world_size // self.strategy_config.model_parallel_size

    @property
    def global_batch_size(self) -> int:
        t = self.sft_train.training_args
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.data_parallel_size


_RANGE = re.compile(r"^\s*list\s*\(\s*range\s*\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?(?:,\s*(\d+)\s*)?\)\s*\)\s*$")


def parse_device_mapping(value: Any) -> list[int]:
    """Parse `device_mapping` without eval.

    >>> parse_device_mapping("list(range(0,4))")
    [0, 1, 2, 3]
    >>> parse_device_mapping("[0, 2]"), parse_device_mapping([1])
    ([0, 2], [1])
    """
    if isinstance(value, str):
        match = _RANGE.match(value)
        if match:
            nums = [int(g) for g in match.groups() if g is not None]
            value = list(range(*nums))
        else:
            try:
                value = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise ValueError(
                    f"cannot parse {value!r}; write a list of device ids like [0, 1] or 'list(range(0,8))'"
                ) from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"expected a non-empty list of device ids, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"device ids must be non-negative integers, got {list(value)!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"device ids must be unique, got {list(value)!r}")
    return list(value)


# An NVIDIA driver (its /proc entry, its control device: what a container with GPUs is given too),
# WSL2's GPU device, or ROCm's compute device.
_GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _gpu_count() -> int:
    # Without a GPU driver there is nothing for torch to find, and its import takes ~2 s: the checks
    # run before `sft run` starts anything (Ray waits for them).
    if sys.platform == "linux" and not any(os.path.exists(p) for p in _GPU_DRIVER_PATHS):
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or broken CUDA: treat as CPU
        return 0


def available_devices() -> tuple[str, int]:
    """('cuda', n GPUs) where GPUs exist, else ('cpu', n cores): what device_mapping indexes."""
    gpus = _gpu_count()
    if gpus:
        return "cuda", gpus
    return "cpu", os.cpu_count() or 1


def _has_transformer_engine() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def check_runnable(cfg: SFTConfig, devices: tuple[str, int] | None = None) -> None:
    """What a valid config may still ask that this machine or version cannot do: stop before any
    worker starts: a device_mapping larger than the machine, or context parallelism without TE."""
    kind, count = devices or available_devices()
    if problem := cfg.strategy_config.machine_problem(kind, _has_transformer_engine()):
        raise ConfigError(f"config key 'sft_train.strategy_args.strategy_config': {problem}")
    mapping = cfg.sft_train.device_mapping
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return  # a multi-node cluster: Ray's scheduler is the judge of capacity
    if max(mapping) >= count:
        raise ConfigError(
            f"config key 'sft_train.device_mapping': {mapping} needs {max(mapping) + 1} {kind} devices "
            f"but this machine has {count}. Use at most list(range(0,{count})), or join a larger Ray "
            "cluster by setting RAY_ADDRESS."
        )


def validate_config(raw: dict[str, Any], source: str = "config") -> SFTConfig:
    """Validate a plain dict into `SFTConfig`, turning pydantic's report into a ConfigError."""
    try:
        return SFTConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, raw, source)) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple"}
_KEYED = re.compile(r"([\w.]+): (.*)", re.DOTALL)  # a cross check's message: "<dotted.key>: <why>"


def _format_errors(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = []
    for e in err.errors():
        # pydantic adds union-member tags such as 'str' or 'function-after[...]' to the location
        loc = [str(p) for p in e["loc"] if "[" not in str(p) and str(p) not in _TYPE_TAGS]
        loc, parent_model = _walk(SFTConfig, loc)
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = ""
            if parent_model is not None:
                close = difflib.get_close_matches(loc[-1], list(parent_model.model_fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
            lines.append(f"config key '{key}': unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"config key '{key}': required but not set")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if not loc and (keyed := _KEYED.fullmatch(msg)):  # the whole config's checks name their key
                key, msg = keyed.groups()
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) and got is not None else ""
            lines.append(f"config key '{key}': {msg}{shown}")
    return f"Invalid {source}:\n  " + "\n  ".join(dict.fromkeys(lines))


def _walk(model: type[BaseModel], loc: list[str]) -> tuple[list[str], type[BaseModel] | None]:
    """Follow an error location through the config's models: (the location as the user writes the
    key, the model that holds its last part). A union keyed on a name (strategy_args) puts that
    name into the location; it picks the member and is not part of the key."""
    keys: list[str] = []
    current: type[BaseModel] | None = model
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        keys.append(part)
        if not parts:
            break  # the last part: `current` holds it
        field = current.model_fields.get(part) if current is not None else None
        if field is None:
            current = None
            continue
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        tagged = {_tag(c): c for c in nested if _tag(c) is not None}
        current = tagged[parts.pop(0)] if parts[0] in tagged else (nested[0] if nested else None)
    return keys, current


def _tag(model: type[BaseModel]) -> str | None:
    """The value a discriminated union's member is selected by (its Literal name field), if any."""
    field = model.model_fields.get("strategy_name")
    return field.default if field is not None and isinstance(field.default, str) else None


def resolve_paths(cfg: SFTConfig, base: Path) -> SFTConfig:
    """Make every path absolute against `base` (the directory the user ran from).

    Ray workers and Prefect task processes may run elsewhere; they only ever see absolute paths.
    """

    def absolute(p: str) -> str:
        if p.startswith("hf://"):  # a hub dataset id, not a path
            return p
        return (
            str((base / os.path.expanduser(p)).resolve()) if not os.path.isabs(os.path.expanduser(p)) else p
        )

    def files(names: list[str], key: str) -> list[str]:
        # A pattern (`data/*.jsonl`, `shards/**/*.parquet`) is the files it matches now, sorted: a
        # scheduled run reads the shards present when it starts. A name that exists is itself, even
        # with [ ] in it; a pattern that matches nothing is kept, for the check that names it.
        out: list[str] = []
        matched_by: dict[str, str] = {}  # file -> the entry that gave it
        for name in map(absolute, names):
            found = (
                [] if os.path.exists(name) or not glob.has_magic(name) else glob.glob(name, recursive=True)
            )
            for f in sorted({f for f in found if os.path.isfile(f)}) or [name]:
                # An entry written twice is read twice (upsampling, as written); a file reached by
                # two different entries (overlapping patterns) is an overlap nobody wrote: refused.
                if matched_by.get(f, name) != name:
                    raise ConfigError(
                        f"config key '{key}': file '{f}' is matched by both '{matched_by[f]}' and '{name}', "
                        "so it would be read twice. Narrow the patterns (or name the file twice to mean it)."
                    )
                matched_by[f] = name
                out.append(f)
        return out

    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = absolute(cfg.output_dir)
    cfg.logging_dir = absolute(cfg.logging_dir)
    data = cfg.sft_train.data_args
    data.file_name = files(data.files(), "sft_train.data_args.file_name")
    if cfg.validation and cfg.validation.data_args.file_name:
        cfg.validation.data_args.file_name = files(cfg.validation_files, "validation.data_args.file_name")
    if cfg.global_template and cfg.global_template.endswith(".jinja"):
        cfg.global_template = absolute(cfg.global_template)
    for args in (data, cfg.validation.data_args if cfg.validation else None):
        if args is not None and args.template and args.template.endswith(".jinja"):
            args.template = absolute(args.template)
    if pretrain_kind(cfg.pretrain, base) == "path":
        cfg.pretrain = absolute(cfg.pretrain)
    if isinstance(cfg.resume_from_checkpoint, str) and cfg.resume_from_checkpoint not in ("auto", "false"):
        cfg.resume_from_checkpoint = absolute(cfg.resume_from_checkpoint)
    if "log_dir" in cfg.tracker_kwargs:
        cfg.tracker_kwargs["log_dir"] = absolute(str(cfg.tracker_kwargs["log_dir"]))
    return cfg
