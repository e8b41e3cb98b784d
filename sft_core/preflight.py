"""Cheap checks of a config before any server, cluster or data work starts: paths that must exist.
Run by the CLI before it starts a server and by the flow itself, so deployment runs get them too."""

from __future__ import annotations

from pathlib import Path

from sft_core.config import SFTConfig


def preflight(cfg: SFTConfig) -> None:
    """Cheap checks before any server or cluster starts: paths that must exist."""
    from sft_core.data.sources import read_rows
    from sft_core.errors import DataError, ModelError

    for key, files in (
        ("sft_train.data_args.file_name", cfg.sft_train.data_args.files()),
        ("validation.data_args.file_name", cfg.validation_files),
    ):
        for f in files:
            if not f.startswith("hf://") and not Path(f).exists():
                next(read_rows(f, key), None)  # raises the DataError naming file and key
    p = cfg.pretrain
    if not p.startswith("embedded:") and p.startswith((".", "/", "~")) and not Path(p).expanduser().exists():
        raise ModelError(f"config key 'pretrain': '{p}' does not exist.")
    if cfg.template.endswith(".jinja") and not Path(cfg.template).is_file():
        raise DataError(
            f"config key 'global_template' / 'sft_train.data_args.template': '{cfg.template}' does not exist."
        )
