"""Cache keys built from real inputs: file contents, the relevant config, tokenizer, code version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import sft_core

_CODE_DIRS = ("data", "model")


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    p = Path(path)
    if path.startswith("hf://"):
        return path  # keyed by name only: a change upstream is not seen (use local files to be exact)
    folder, colon, split = path.rpartition(":")
    if not p.exists() and colon and Path(folder).is_dir():  # one split of a saved DatasetDict
        return f"{file_digest(folder)}:{split}"
    if p.is_dir():  # a save_to_disk folder: hash its files (by path: splits hold files of one name)
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(p)).encode())
                h.update(f.read_bytes())
        return h.hexdigest()
    if not p.is_file():
        return f"missing:{path}"  # the task itself reports the missing file properly
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_digest() -> str:
    """Hash of the data/model code: a change to how data is encoded invalidates encoded caches."""
    h = hashlib.sha256()
    root = Path(sft_core.__file__).parent
    for sub in _CODE_DIRS:
        for f in sorted((root / sub).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
