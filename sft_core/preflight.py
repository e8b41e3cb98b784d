"""Cheap checks of a config before any server, cluster or data work starts: paths that must exist,
and a built-in template's special tokens in the model's tokenizer. Run by the CLI before it starts
a server and by the flow itself, so deployment runs get them too."""

from __future__ import annotations

from pathlib import Path

from sft_core.config import SFTConfig
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
            if not f.startswith("hf://") and not Path(f).exists():
                next(read_rows(f, key), None)  # raises the DataError naming file and key
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
