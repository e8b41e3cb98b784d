"""Cheap checks of a config before any server, cluster or data work starts: paths that must exist,
and a built-in template's special tokens in the model's tokenizer. `load_run_config` is the one
path from config name and overrides to a checked config: the flow calls it first (so deployment
runs get every check), and the CLI calls it before it starts a server, to fail fast; in a CLI run the
flow then finds that config already checked in its process."""

from __future__ import annotations

import os
from pathlib import Path

from sft_core.config import SFTConfig, check_runnable
from sft_core.config_loader import load_config
from sft_core.data.templates import TEMPLATE_TOKENS, check_template_tokens
from sft_core.model.source import pretrain_kind


def preflight(cfg: SFTConfig) -> None:
    """Cheap checks before any server or cluster starts."""
    from sft_core.data.sources import read_rows
    from sft_core.errors import DataError, ModelError

    for key, files in (
        ("sft_train.data_args.file_name", cfg.sft_train.data_args.files()),
        ("validation.data_args.file_name", cfg.validation_files),
    ):
        for f in files:
            if not f.startswith("hf://") and not Path(f).is_file():  # missing, or a folder
                next(read_rows(f, key), None)  # raises the DataError naming file and key
    folders = {"output_dir": cfg.output_dir, "logging_dir": cfg.logging_dir}
    if "log_dir" in cfg.tracker_kwargs:  # TensorBoard's folder, where it is set
        folders["tracker_kwargs.log_dir"] = str(cfg.tracker_kwargs["log_dir"])
    for key, folder in folders.items():
        check_writable_folder(key, Path(folder))
    if cfg.sft_train.model_args.compile:
        check_compiler()
    p = cfg.pretrain
    if pretrain_kind(p) == "path" and not Path(p).expanduser().exists():
        raise ModelError(f"config key 'pretrain': '{p}' does not exist.")
    templates = {cfg.template_for(split) for split in ("train", "validation")}
    for name in templates:
        if name.endswith(".jinja") and not Path(name).is_file():
            raise DataError(
                f"config key 'global_template' / '*.data_args.template': '{name}' does not exist."
            )
    if builtins := sorted(templates & set(TEMPLATE_TOKENS)):
        from sft_core.model.resolve import load_tokenizer, resolve_pretrained

        tokenizer = load_tokenizer(resolve_pretrained(cfg.pretrain))  # resolved once, cached on disk
        for name in builtins:
            check_template_tokens(name, tokenizer)


_COMPILERS = ("g++", "c++", "clang++", "gcc", "cc")  # what inductor (C++) and Triton (C) look for


def check_compiler() -> None:
    """torch.compile builds its kernels with the machine's C/C++ compiler (C++ on CPU, C for Triton's
    launcher on GPU): without one the first step would fail inside every worker."""
    import shutil

    from sft_core.errors import ConfigError

    names = [os.environ[v] for v in ("CXX", "CC") if os.environ.get(v)] + list(_COMPILERS)
    if not any(shutil.which(n) for n in names):
        raise ConfigError(
            "config key 'sft_train.model_args.compile': torch.compile needs a C/C++ compiler and none was "
            f"found ({', '.join(names)} on PATH). Install one (e.g. apt install g++) or set compile: false."
        )


def check_writable_folder(key: str, folder: Path) -> None:
    """`folder` is a folder this user can write in, or can be made in one (found before a server,
    Ray or the data are started, not when the first file is written)."""
    from sft_core.errors import ConfigError

    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file, not a folder" if existing == folder else f"cannot be made: {existing} is a file"
        raise ConfigError(f"config key '{key}': '{folder}' {what}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"config key '{key}': '{folder}' cannot be written: {existing} is not writable by this user."
        )


_checked: set[str] = set()  # configs (as JSON, with the directory they were resolved from) checked here


def load_run_config(
    config_name: str, overrides: list[str], config_path: str | None = None, base_dir: Path | None = None
) -> SFTConfig:
    """Compose and validate the config (relative paths from `base_dir`, else the cwd), then check it
    against this machine and its files, once per process for the same resulting config."""
    cfg = load_config(config_name, overrides, config_path, base_dir)
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: SFTConfig) -> None:
    """Check a loaded config against this machine and its files, once per process."""
    key = f"{Path.cwd()}\n{cfg.model_dump_json()}"
    if key not in _checked:
        check_runnable(cfg)
        preflight(cfg)
        _checked.add(key)
