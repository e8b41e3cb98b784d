"""Resolve the pretrained model and prepare its tokenizer."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from sft_core import home
from sft_core.model.prepared_tokenizer import PreparedTokenizer
from sft_core.model.resolve import load_tokenizer, resolve_pretrained, tokenizer_fingerprint


@task(name="resolve-model", cache_policy=NONE, retries=1, retry_delay_seconds=2)
def resolve_model(pretrain: str) -> str:
    """A local Hugging Face folder for `pretrain` (GGUF conversion is cached on disk)."""
    return str(resolve_pretrained(pretrain))


@task(name="load-tokenizer", cache_policy=NONE)
def prepare_tokenizer(model_dir: str) -> PreparedTokenizer:
    """Load the tokenizer with its fixes (eos, pad, no BOS) and save it where every stage reads it."""
    tokenizer = load_tokenizer(model_dir)
    root = home.tokenizers()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    tokenizer.save_pretrained(staging)
    fingerprint = tokenizer_fingerprint(staging)
    out = root / fingerprint[:16]
    if out.exists():
        shutil.rmtree(staging)
    else:
        staging.rename(out)
    return PreparedTokenizer(
        tokenizer_dir=str(out),
        fingerprint=fingerprint,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        vocab_size=len(tokenizer),
    )
