"""Resolve the pretrained model and prepare its tokenizer."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from sft_core import home
from sft_core.model.prepared_tokenizer import PreparedTokenizer
from sft_core.model.resolve import load_tokenizer, resolve_pretrained, tokenizer_fingerprint
from tasks.caching import code_digest, digest, file_digest

# Files of a model folder that cannot change how its tokenizer loads (hashing them would be slow).
_WEIGHTS = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx"}


@task(name="resolve-model", cache_policy=NONE, retries=1, retry_delay_seconds=2)
def resolve_model(pretrain: str) -> str:
    """A local Hugging Face folder for `pretrain` (GGUF conversion is cached on disk)."""
    return str(resolve_pretrained(pretrain))


def _source_key(model_dir: str) -> str:
    """What the prepared tokenizer depends on: the model folder's files other than weights (the
    tokenizer, config and generation config), the code that fixes it, the transformers version."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.suffix not in _WEIGHTS)
    return digest(
        "tokenizer", [(p.name, file_digest(str(p))) for p in files], code_digest(), version("transformers")
    )


def _recorded(record: Path) -> PreparedTokenizer | None:
    """The tokenizer prepared before from the same source, if its folder is still intact."""
    try:
        prepared = PreparedTokenizer(**json.loads(record.read_text()))
        if tokenizer_fingerprint(prepared.tokenizer_dir) == prepared.fingerprint:
            return prepared
    except (OSError, ValueError, TypeError):
        pass
    return None


@task(name="load-tokenizer", cache_policy=NONE)
def prepare_tokenizer(model_dir: str) -> PreparedTokenizer:
    """Load the tokenizer with its fixes (eos, pad, no BOS) and save it where every stage reads it.
    Done once per source (model folder files, code, transformers version): later runs read the
    record, without loading the tokenizer again (seconds)."""
    root = home.tokenizers()
    record = root / "by-source" / f"{_source_key(model_dir)}.json"
    if prepared := _recorded(record):
        return prepared
    tokenizer = load_tokenizer(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    tokenizer.save_pretrained(staging)
    fingerprint = tokenizer_fingerprint(staging)
    out = root / fingerprint[:16]
    if out.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(out)
    prepared = PreparedTokenizer(
        tokenizer_dir=str(out),
        fingerprint=fingerprint,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        vocab_size=len(tokenizer),
    )
    record.parent.mkdir(exist_ok=True)
    tmp = record.with_suffix(f".{staging.name}.tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(prepared)))
    tmp.replace(record)  # atomic: a concurrent run reads the old record or the new, never half
    return prepared
