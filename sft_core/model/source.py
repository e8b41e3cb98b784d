"""What a `pretrain` value names: an embedded model, a local path (folder or .gguf), or a hub id.
Decided here only; the config makes paths absolute, preflight checks they exist, and the resolver
loads them, each by asking this module."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

EMBEDDED_PREFIX = "embedded:"

PretrainKind = Literal["embedded", "path", "hub"]


def pretrain_kind(pretrain: str, base: Path | None = None) -> PretrainKind:
    """A path if it is written as one (./, /, ~, a .gguf file) or exists relative to `base` (the
    directory the user ran from); a hub id ('org/name') otherwise.

    >>> pretrain_kind("embedded:tiny-smollm2"), pretrain_kind("./m"), pretrain_kind("HuggingFaceTB/SmolLM2")
    ('embedded', 'path', 'hub')
    """
    if pretrain.startswith(EMBEDDED_PREFIX):
        return "embedded"
    if pretrain.startswith((".", "/", "~")) or pretrain.endswith(".gguf"):
        return "path"
    if base is not None and (base / pretrain).exists():
        return "path"
    return "hub"
