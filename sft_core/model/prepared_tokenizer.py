"""The tokenizer as a run prepared it (fixes applied, saved once), handed to every later stage."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreparedTokenizer:
    tokenizer_dir: str  # saved folder every stage loads (content-addressed by fingerprint)
    fingerprint: str  # hash of its files: part of the encode cache key
    eos_token: str
    pad_token: str
    vocab_size: int
