"""Read data files into rows, with errors that name the file, the row and the field.

Sources: JSON (a list of objects, or JSON lines), JSONL, Parquet, and a folder written by
`datasets.Dataset.save_to_disk`. A row that cannot be read at all (broken JSON, not an object)
comes back as a `Row` with `error` set, so the caller applies the `on_bad_row` policy to it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_core.errors import DataError

HUB_PREFIX = "hf://"


@dataclass(frozen=True)
class Row:
    file: str
    index: int  # 1-based row number (the line number for JSONL), as a person counts
    data: dict[str, Any]
    error: str | None = None  # why the row could not be read; data then holds {"raw": ...}

    @property
    def where(self) -> str:
        return f"{self.file}, row {self.index}"


def read_rows(path: str, config_key: str = "sft_train.data_args.file_name") -> Iterator[Row]:
    if path.startswith(HUB_PREFIX):
        yield from _hub_rows(path, config_key)
        return
    p = Path(path)
    if p.is_dir() and (p / "dataset_info.json").is_file():
        yield from _saved_dataset_rows(p)
        return
    if not p.is_file():
        raise DataError(
            f"data file '{path}' does not exist (set by config key '{config_key}'). "
            "Check the path; relative paths are resolved from the directory you ran the command in."
        )
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(p)
    elif suffix == ".jsonl":
        yield from _jsonl_rows(p)
    else:
        yield from _json_rows(p)


def _jsonl_rows(p: Path) -> Iterator[Row]:
    with p.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(
                    str(p),
                    line_no,
                    {"raw": line.rstrip("\n")},
                    f"line {line_no}: not valid JSON ({e.msg} at column {e.colno})",
                )
                continue
            if not isinstance(data, dict):
                yield Row(
                    str(p),
                    line_no,
                    {"raw": data},
                    f"line {line_no}: expected a JSON object, got {type(data).__name__}",
                )
                continue
            yield Row(str(p), line_no, data)


def _json_rows(p: Path) -> Iterator[Row]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            yield from _jsonl_rows(p)
            return
        raise DataError(f"{p}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of objects, got {type(data).__name__}.")
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            yield Row(str(p), i, {"raw": item}, f"row {i}: expected a JSON object, got {type(item).__name__}")
            continue
        yield Row(str(p), i, item)


def _parquet_rows(p: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    for i, item in enumerate(pq.read_table(p).to_pylist(), start=1):
        yield Row(str(p), i, item)


def _hub_rows(path: str, config_key: str) -> Iterator[Row]:
    """`hf://org/name` (split train) or `hf://org/name:split`, through datasets.load_dataset."""
    import os

    name, _, split = path.removeprefix(HUB_PREFIX).partition(":")
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(f"config key '{config_key}': '{path}' is a hub dataset, but the hub is switched off here "
                        "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE). Download it and give the local file.")  # fmt: skip
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split or "train")
    except Exception as err:  # network, a missing dataset or split: the user's to fix
        raise DataError(f"config key '{config_key}': cannot load hub dataset '{name}' ({err}).") from None
    for i, item in enumerate(dataset, start=1):
        yield Row(path, i, dict(item))


def _saved_dataset_rows(p: Path) -> Iterator[Row]:
    from datasets import load_from_disk

    for i, item in enumerate(load_from_disk(str(p)), start=1):
        yield Row(str(p), i, dict(item))
