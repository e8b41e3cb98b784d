"""Read data files into rows, with errors that name the file, the row and the field.

Sources: JSON (a list of objects, or JSON lines), JSONL, Parquet, and a folder written by
`datasets.Dataset.save_to_disk`. A row that cannot be read at all (broken JSON, not an object)
comes back as a `Row` with `error` set, so the caller applies the `on_bad_row` policy to it.
"""

from __future__ import annotations

import json
import re
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


# Files are read as UTF-8 (a leading BOM is skipped); bytes that are not UTF-8 are kept as surrogate
# escapes, so the row holding them is a bad row naming its field, and every other row still reads.
_ENCODING, _ERRORS = "utf-8-sig", "surrogateescape"


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a surrogate written as a JSON escape


def _not_utf8(value: object, path: str = "") -> str | None:
    """The field path of the first string that is not valid text: bytes that were not UTF-8 (kept
    as surrogate escapes) or a lone surrogate from a JSON escape; the tokenizer cannot take either."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        if (found := _not_utf8(item, sub)) is not None:
            return found
    return None


def _checked(p: Path, index: int, unit: str, data: object, raw: object, suspect: bool = True) -> Row:
    if not isinstance(data, dict):
        return Row(
            str(p), index, {"raw": raw}, f"{unit} {index}: expected a JSON object, got {type(data).__name__}"
        )
    if suspect and (bad := _not_utf8(data)) is not None:
        return Row(
            str(p), index, {"raw": _printable(raw)}, f"{unit} {index}: field '{bad}' is not valid UTF-8 text"
        )
    return Row(str(p), index, data)


def _printable(raw: object) -> object:
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return raw


def count_rows(path: str) -> int | None:
    """How many rows `read_rows` will yield, where that is cheap to know (JSON lines: a pass
    counting non-blank lines; Parquet: its metadata), else None. For progress, never for logic."""
    p = Path(path)
    if p.suffix.lower() == ".parquet" and p.is_file():
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(p).metadata.num_rows
        except Exception:  # unreadable: read_rows says why
            return None
    if p.suffix.lower() == ".jsonl" and p.is_file():
        with p.open("rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def _jsonl_rows(p: Path) -> Iterator[Row]:
    # Rows end at "\n" only (a CRLF's "\r" is dropped): a bare "\r" is JSON whitespace between
    # fields or part of a broken row, never a row break, so row numbers stay the file's line numbers.
    with p.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.decode("utf-8", _ERRORS).removesuffix("\n").removesuffix("\r")
            if line_no == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 BOM
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                yield Row(
                    str(p),
                    line_no,
                    {"raw": _printable(line)},
                    f"line {line_no}: not valid JSON ({e.msg} at column {e.colno})",
                )
                continue
            # Only a line holding a surrogate (or its escape) needs the field-by-field look.
            suspect = bool(_SURROGATE.search(line) or _SURROGATE_ESCAPE.search(line))
            yield _checked(p, line_no, "line", data, line, suspect)


def _json_rows(p: Path) -> Iterator[Row]:
    text = p.read_text(encoding=_ENCODING, errors=_ERRORS)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith("["):  # objects one per line in a .json file: read as JSON lines
            yield from _jsonl_rows(p)
            return
        raise DataError(
            f"{p}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}). A JSON list is read "
            "whole, so one broken row stops it; fix it, or write one object per line to have bad rows "
            "handled by on_bad_row."
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of objects, got {type(data).__name__}.")
    for i, item in enumerate(data, start=1):
        yield _checked(p, i, "row", item, item)


def _parquet_rows(p: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{p}: cannot be read as Parquet ({err}).") from None
    for i, item in enumerate(table.to_pylist(), start=1):
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
