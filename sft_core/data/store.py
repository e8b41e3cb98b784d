"""The stored arrays of an encoded split, and the JSON-lines reports written beside them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sft_core.home import staged


@dataclass
class EncodedData:
    """All samples as flat arrays: sample i is `input_ids[offsets[i]:offsets[i+1]]`."""

    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where not supervised
    offsets: np.ndarray  # int64, len = samples + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    @classmethod
    def from_samples(cls, ids: list[np.ndarray], labels: list[np.ndarray]) -> EncodedData:
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in ids], out=offsets[1:])
        empty = np.zeros(0, dtype=np.int32)
        return cls(
            np.concatenate(ids) if ids else empty, np.concatenate(labels) if labels else empty, offsets
        )

    def digest(self) -> str:
        """A hash of the samples themselves: tokens, labels and where each sample ends."""
        h = hashlib.sha256()
        for array in (self.input_ids, self.labels, self.offsets):
            h.update(str(array.dtype).encode())
            h.update(np.ascontiguousarray(array).data)  # a view, no copy
        return h.hexdigest()[:32]

    def sample_digests(self) -> set[bytes]:
        """A digest of each sample's tokens, to find the same sample in another split."""
        ids, ends = self.input_ids, self.offsets
        return {
            hashlib.blake2b(ids[a:b].tobytes(), digest_size=16).digest()
            for a, b in zip(ends[:-1], ends[1:], strict=True)
        }

    def count_in(self, digests: set[bytes]) -> int:
        """How many of these samples have their exact tokens among `digests` (another split's)."""
        ids, ends = self.input_ids, self.offsets
        return sum(
            hashlib.blake2b(ids[a:b].tobytes(), digest_size=16).digest() in digests
            for a, b in zip(ends[:-1], ends[1:], strict=True)
        )

    def save(self, path: Path) -> None:
        _digest_file(path).unlink(missing_ok=True)  # never a digest of what was there before
        tmp = staged(path)
        np.savez(tmp, input_ids=self.input_ids, labels=self.labels, offsets=self.offsets)
        tmp.replace(path)
        _write_digest(path, self.digest())

    @classmethod
    def load(cls, path: str | Path) -> EncodedData:
        with np.load(path) as z:
            return cls(z["input_ids"], z["labels"], z["offsets"])


def _digest_file(path: Path) -> Path:
    return path.with_suffix(".digest")


def _write_digest(path: Path, value: str) -> None:
    tmp = staged(_digest_file(path))
    tmp.write_text(value)
    tmp.replace(_digest_file(path))


def stored_digest(path: str | Path) -> str:
    """EncodedData.digest of the split stored at `path`, kept beside it (`encoded.digest`) when it
    is saved: what a run trains on is compared by content on every run and resume, and a large
    split is hashed once. A split saved before the digest was kept gets it now."""
    p = Path(path)
    try:
        return _digest_file(p).read_text()
    except FileNotFoundError:
        value = EncodedData.load(p).digest()
        _write_digest(p, value)
        return value


def write_jsonl(entries: list[dict[str, Any]], path: Path) -> None:
    # backslashreplace: a rejected row may hold bytes that were not UTF-8 (kept as surrogate escapes).
    tmp = staged(path)
    with tmp.open("w", encoding="utf-8", errors="backslashreplace") as f:
        for entry in entries:
            f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    tmp.replace(path)
