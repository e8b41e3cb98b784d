"""Rows -> chat messages -> token ids + labels, with the length policy applied and counted."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft_core.data import IGNORE_INDEX
from sft_core.data.sources import Row, read_rows
from sft_core.data.templates import ChatTemplate, supervised_char_spans
from sft_core.errors import DataError


@dataclass(frozen=True)
class FieldMapping:
    """The seed's field mapping; a row with a `messages` list is used as it is."""

    prompt_key: str = "instruction"
    response_key: str = "output"
    query_key: str | None = None
    system_key: str | None = None


def row_to_messages(row: Row, fields: FieldMapping) -> list[dict[str, str]]:
    """Map one row to chat messages; a missing or empty required field names file, row and field."""
    data = row.data
    if "messages" in data and fields.prompt_key not in data:
        return _checked_messages(row, data["messages"])

    def text(key: str, role: str, required: bool) -> str:
        value = data.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                state = "is missing" if key not in data else "is empty"
                raise DataError(
                    f"{row.where}: field '{key}' ({role}) {state}. Every row needs it; "
                    f"set {role} in the config if your data names it differently."
                )
            return ""
        if not isinstance(value, str):
            raise DataError(
                f"{row.where}: field '{key}' ({role}) must be a string, got {type(value).__name__}."
            )
        return value

    prompt = text(fields.prompt_key, "prompt_key", required=True)
    query = text(fields.query_key, "query_key", required=False) if fields.query_key else ""
    response = text(fields.response_key, "response_key", required=True)
    system = text(fields.system_key, "system_key", required=False) if fields.system_key else ""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    messages.append({"role": "assistant", "content": response})
    return messages


def _checked_messages(row: Row, messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{row.where}: field 'messages' must be a non-empty list of {{role, content}} objects."
        )
    out = []
    for j, m in enumerate(messages, start=1):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise DataError(f"{row.where}: field 'messages[{j}]' needs string 'role' and 'content'.")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            f"{row.where}: field 'messages' has no assistant turn, so nothing would be trained on."
        )
    return out


@dataclass
class EncodeStats:
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    report: list[dict[str, Any]] = field(default_factory=list)  # one entry per truncated/dropped sample


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

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, input_ids=self.input_ids, labels=self.labels, offsets=self.offsets)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> EncodedData:
        with np.load(path) as z:
            return cls(z["input_ids"], z["labels"], z["offsets"])


def encode_messages(
    tokenizer: Any, template: ChatTemplate, messages: list[dict[str, str]], where: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation: labels keep ids only inside supervised spans."""
    text, spans = supervised_char_spans(template, tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    span_i = 0
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        while span_i < len(spans) and start >= spans[span_i][1]:
            span_i += 1
        if span_i < len(spans) and spans[span_i][0] <= start:
            labels[t] = ids[t]
    return ids, labels


def encode_files(
    files: list[str],
    tokenizer: Any,
    template: ChatTemplate,
    fields: FieldMapping,
    sequence_length: int,
    length_policy: str = "truncate",
    config_key: str = "sft_train.data_args.file_name",
) -> tuple[EncodedData, EncodeStats]:
    """Encode every row of `files`. Over-long samples follow `length_policy` and are all reported."""
    all_ids: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    stats = EncodeStats()
    for file in files:
        for row in read_rows(file, config_key):
            messages = row_to_messages(row, fields)
            ids, labels = encode_messages(tokenizer, template, messages, row.where)
            if len(ids) > sequence_length:
                entry = {
                    "file": row.file,
                    "row": row.index,
                    "tokens": len(ids),
                    "sequence_length": sequence_length,
                }
                if length_policy == "error":
                    raise DataError(
                        f"{row.where}: the sample has {len(ids)} tokens, more than sequence_length={sequence_length} "
                        "(sft_train.data_args.length_policy=error). Raise sequence_length or use truncate/drop."
                    )
                if length_policy == "truncate":
                    ids, labels = ids[:sequence_length], labels[:sequence_length]
                if length_policy == "drop" or all(lab == IGNORE_INDEX for lab in labels[1:]):
                    # Nothing left to learn from after the cut: counted and listed, never trained on.
                    stats.dropped += 1
                    stats.report.append({**entry, "action": "dropped"})
                    continue
                stats.truncated += 1
                stats.report.append({**entry, "action": "truncated"})
            all_ids.append(np.asarray(ids, dtype=np.int32))
            all_labels.append(np.asarray(labels, dtype=np.int32))
            stats.samples += 1
            stats.tokens += len(ids)
            stats.supervised_tokens += sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)
    if not all_ids:
        raise DataError(f"no usable samples in {', '.join(files)} (config key '{config_key}').")
    offsets = np.zeros(len(all_ids) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in all_ids], out=offsets[1:])
    data = EncodedData(np.concatenate(all_ids), np.concatenate(all_labels), offsets)
    return data, stats


def write_report(stats: EncodeStats, path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for entry in stats.report:
            f.write(json.dumps(entry) + "\n")
