"""Read data files into rows, with errors that name the file, the row and the field.

Sources: JSON (a list of objects, or JSON lines), JSONL, Parquet, CSV and TSV (a header row names
the columns; every value is text), each also gzip-compressed (`train.jsonl.gz`), and a folder written by `save_to_disk`: a `Dataset`, or a `DatasetDict` as
`folder:split` (a bare folder takes the split named for its role: `train`, or `validation`). A row
that cannot be read at all (broken JSON, not an object, nested absurdly deep) comes back as a `Row`
with `error` set, so the caller applies the `on_bad_row` policy to it.
"""

from __future__ import annotations

import csv
import glob
import gzip
import json
import re
import zlib
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
    if not p.exists() and (split_of := _dict_split(path)) is not None:
        yield from _dataset_dict_rows(Path(split_of[0]), split_of[1], config_key)
        return
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        yield from _dataset_dict_rows(p, None, config_key)
        return
    if p.is_dir() and (p / "dataset_info.json").is_file():
        yield from _saved_dataset_rows(p)
        return
    if not p.is_file():
        if p.is_dir():
            what = (
                "is a folder, but not one written by save_to_disk; to read the data files in it, "
                f"give a pattern such as '{p / '*.jsonl'}'"
            )
        else:
            what = "matches no file" if glob.has_magic(path) else "does not exist"
        raise DataError(
            f"data file '{path}' {what} (set by config key '{config_key}'). "
            "Check the path; relative paths are resolved from the directory you ran the command in."
        )
    suffix = _format_suffix(p)
    if suffix == ".parquet":
        yield from _parquet_rows(p)
    elif suffix in _DELIMITERS:
        yield from _delimited_rows(p, _DELIMITERS[suffix])
    elif suffix == ".jsonl":
        yield from _jsonl_rows(p)
    else:
        yield from _json_rows(p)


def _format_suffix(p: Path) -> str:
    """The suffix that names the format, under a `.gz`: `train.jsonl.gz` -> `.jsonl`."""
    suffix = p.suffix.lower()
    return Path(p.stem).suffix.lower() if suffix == ".gz" else suffix


def _is_gzip(p: Path) -> bool:
    # By the magic bytes, not the name: a gzip file named `.jsonl` is read too.
    with p.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


# UTF-16 (what Windows' PowerShell `>` and Notepad's "Unicode" write) and UTF-32 byte-order marks:
# read as UTF-8 every line would be "not valid JSON", so the file is named for what it is.
_WIDE_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
              b"\xfe\xff": "UTF-16"}  # fmt: skip


def _utf8_lines(p: Path, lines: Iterator[bytes]) -> Iterator[bytes]:
    first = next(lines, None)
    if first is None:
        return
    if wide := next((name for bom, name in _WIDE_BOMS.items() if first.startswith(bom)), None):
        raise DataError(f"{p}: is {wide}-encoded (its byte-order mark says so); save it as UTF-8.")
    yield first
    yield from lines


def _lines(p: Path) -> Iterator[bytes]:
    """The file's lines as bytes, gunzipped when it is gzip; a broken gzip stream names the file,
    and so does text in UTF-16 or UTF-32."""
    if not _is_gzip(p):
        with p.open("rb") as f:
            yield from _utf8_lines(p, iter(f))
        return
    with gzip.open(p, "rb") as f:
        try:
            yield from _utf8_lines(p, iter(f))
        except (OSError, EOFError, zlib.error) as err:  # not gzip after all, truncated, corrupt
            raise DataError(
                f"{p}: cannot be read as gzip ({err}). Check the file, or give it uncompressed."
            ) from None


# Files are read as UTF-8 (a leading BOM is skipped); bytes that are not UTF-8 are kept as surrogate
# escapes, so the row holding them is a bad row naming its field, and every other row still reads.
_ENCODING, _ERRORS = "utf-8-sig", "surrogateescape"
_BOM = b"\xef\xbb\xbf"

# Chat rows nest a handful of levels. Far deeper data is refused as a bad row where it is read: code
# that walks it recursively (json.loads itself, pickling to worker processes) would overflow the stack.
_MAX_DEPTH = 100


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a surrogate written as a JSON escape


def _nodes(value: object, path: str = "") -> Iterator[tuple[str, object]]:
    """Every value inside a decoded row with its field path (`messages[2].content`), depth first,
    each object before what it holds. Rows are checked not to nest absurdly deep before this runs."""
    yield path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from _nodes(
            item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        )


def _not_utf8(value: object) -> str | None:
    """The field path of the first string that is not valid text: bytes that were not UTF-8 (kept
    as surrogate escapes) or a lone surrogate from a JSON escape; the tokenizer cannot take either."""
    return next((path for path, v in _nodes(value) if isinstance(v, str) and _SURROGATE.search(v)), None)


def _nests_deeper(value: object, limit: int = _MAX_DEPTH) -> bool:
    """Whether lists/objects in `value` nest more than `limit` deep; a loop, so any depth is safe."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


class _RepeatedKeys:
    """A json object hook: objects as dicts, remembering each one whose text names a key twice
    (json keeps the last value and drops the others silently)."""

    def __init__(self) -> None:
        self.found: dict[int, str] = {}  # id of the dict -> the repeated key

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    self.found[id(obj)] = key
                    break
                seen.add(key)
        return obj

    def where(self, value: object) -> str | None:
        """The path of the first key named twice inside `value` (decoded through this hook), or None."""
        if not self.found:
            return None
        return next(
            (
                f"{path}.{self.found[id(v)]}" if path else self.found[id(v)]
                for path, v in _nodes(value)
                if isinstance(v, dict) and id(v) in self.found
            ),
            None,
        )


def _repeated(unit: str, index: int, field: str) -> str:
    return (
        f"{unit} {index}: field '{field}' is given twice in one object; JSON readers keep one of the "
        "values and drop the other silently, so which one is meant cannot be told"
    )


def _too_deep(unit: str, index: int) -> str:
    return f"{unit} {index}: lists/objects nested more than {_MAX_DEPTH} levels deep; no chat row needs that"


def _checked(
    p: Path,
    index: int,
    unit: str,
    data: object,
    raw: object,
    suspect: bool = True,
    repeated: _RepeatedKeys | None = None,
) -> Row:
    if not isinstance(data, dict):
        return Row(
            str(p), index, {"raw": raw}, f"{unit} {index}: expected a JSON object, got {type(data).__name__}"
        )
    if _nests_deeper(data):  # an item of a JSON list is not kept: the rejects file could not hold it
        kept = _printable(raw) if isinstance(raw, str) else "(too deep to keep)"
        return Row(str(p), index, {"raw": kept}, _too_deep(unit, index))
    if repeated is not None and (twice := repeated.where(data)) is not None:
        return Row(str(p), index, {"raw": _printable(raw)}, _repeated(unit, index, twice))
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
    if not p.is_file() or _is_gzip(p):  # a folder or a split: no cheap count; gzip: not a cheap pass
        return None
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(p).metadata.num_rows
        except Exception:  # unreadable: read_rows says why
            return None
    if p.suffix.lower() == ".jsonl":
        with p.open("rb") as f:
            return sum(1 for line in f if line.removeprefix(_BOM).strip())
    return None


def _jsonl_rows(p: Path) -> Iterator[Row]:
    # Rows end at "\n" only (a CRLF's "\r" is dropped): a bare "\r" is JSON whitespace between
    # fields or part of a broken row, never a row break, so row numbers stay the file's line numbers.
    repeated = _RepeatedKeys()
    decoder = json.JSONDecoder(object_pairs_hook=repeated)
    for line_no, raw in enumerate(_lines(p), start=1):
        repeated.found.clear()
        line = raw.decode("utf-8", _ERRORS).removesuffix("\n").removesuffix("\r")
        # A UTF-8 BOM on any line, not only the first: files joined with `cat` keep each one's BOM.
        line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            data = decoder.decode(line)
        except json.JSONDecodeError as e:
            error = f"line {line_no}: not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"
            yield Row(str(p), line_no, {"raw": _printable(line)}, error)
            continue
        except RecursionError:  # the parser's own recursion, long before the row is used
            yield Row(str(p), line_no, {"raw": _printable(line)}, _too_deep("line", line_no))
            continue
        # Only a line holding a surrogate (or its escape) needs the field-by-field look.
        suspect = bool(_SURROGATE.search(line) or _SURROGATE_ESCAPE.search(line))
        yield _checked(p, line_no, "line", data, line, suspect, repeated)


_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def _delimited_rows(p: Path, delimiter: str) -> Iterator[Row]:
    """CSV/TSV rows as {column: text}, numbered by the line each starts on (the header is line 1,
    as an editor or a spreadsheet shows it). Quoting is strict: a quote inside an unquoted value,
    or text after a closing quote, is a bad row (a lenient reader drops the quote marks), and an
    opening quote never closed is one bad row naming every line it took in (a lenient reader would
    make the rest of the file part of one answer). A record with more or fewer fields than the
    header is a bad row: its columns cannot be told apart."""
    csv.field_size_limit(1 << 30)  # an answer may be longer than the module's 128 KiB default
    taken: list[str] = []  # the lines of the record being read, so a bad one keeps its text

    def lines() -> Iterator[str]:
        for n, raw in enumerate(_lines(p)):
            line = raw.decode("utf-8", _ERRORS)
            # A BOM only before the header: later, a U+FEFF may sit inside a quoted value.
            taken.append(line.removeprefix("\ufeff") if n == 0 else line)
            yield taken[-1]

    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
    kind = _format_suffix(p)[1:].upper()
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as err:
        raise DataError(f"{p}, line 1: the header cannot be read as {kind} ({err}).") from None
    if len(set(header)) != len(header) or not all(h.strip() for h in header):
        raise DataError(f"{p}, line 1: the header {header} must name each column once.")
    start = reader.line_num + 1
    while True:
        taken.clear()
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            end = reader.line_num
            span = f" (lines {start}-{end}: a quote opened on line {start} takes in every line after it)"
            yield Row(
                str(p), start, {"raw": _printable("".join(taken))},
                f"line {start}: not valid {kind} ({err}){span if end > start else ''}",
            )  # fmt: skip
        else:
            # Only a line with nothing on it is no row; a record of blank values is a row (and bad).
            if fields and (len(fields) > 1 or fields[0].strip()):
                if len(fields) != len(header):
                    yield Row(
                        str(p), start, {"raw": _printable(delimiter.join(fields))},
                        f"line {start}: {len(fields)} fields, but the header names {len(header)} columns",
                    )  # fmt: skip
                else:
                    record = dict(zip(header, fields, strict=True))
                    yield _checked(
                        p, start, "line", record, delimiter.join(fields), any(map(_SURROGATE.search, fields))
                    )
        start = reader.line_num + 1


def _json_rows(p: Path) -> Iterator[Row]:
    text = b"".join(_lines(p)).decode(_ENCODING, _ERRORS)
    repeated = _RepeatedKeys()
    try:
        data = json.JSONDecoder(object_pairs_hook=repeated).decode(text)
    except (json.JSONDecodeError, RecursionError) as e:
        if not text.lstrip().startswith("["):  # objects one per line in a .json file: read as JSON lines
            yield from _jsonl_rows(p)
            return
        where, why = (
            (f", line {e.lineno}", f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
            if isinstance(e, json.JSONDecodeError)
            else ("", f"lists/objects nested too deep to read (more than {_MAX_DEPTH} levels)")
        )
        raise DataError(
            f"{p}{where}: {why}. A JSON list is read whole, so one broken row stops it; fix it, or write "
            "one object per line to have bad rows handled by on_bad_row."
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of objects, got {type(data).__name__}.")
    for i, item in enumerate(data, start=1):
        yield _checked(p, i, "row", item, item, repeated=repeated)


def _parquet_rows(p: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if _is_gzip(p):
            with gzip.open(p) as f:
                table = pq.read_table(f)
        else:
            table = pq.read_table(p)
    except (pa.ArrowException, OSError, EOFError, zlib.error) as err:
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


def _dict_split(path: str) -> tuple[str, str] | None:
    """`folder:split` -> (folder, split) when folder is a saved DatasetDict (as hub ids name splits)."""
    folder, colon, split = path.rpartition(":")
    return (folder, split) if colon and split and (Path(folder) / "dataset_dict.json").is_file() else None


# The split a bare DatasetDict folder gives each data role, when the folder has exactly one of them.
_ROLE_SPLITS = {"train": ("train",), "validation": ("validation", "valid", "val", "dev")}


def _dataset_dict_rows(p: Path, split: str | None, config_key: str) -> Iterator[Row]:
    from datasets import load_from_disk

    splits = load_from_disk(str(p))
    names = list(splits)
    if split is None:
        role = "validation" if config_key.startswith("validation.") else "train"
        matches = [name for name in names if name in _ROLE_SPLITS[role]]
        if len(matches) != 1:
            raise DataError(
                f"config key '{config_key}': '{p}' is a DatasetDict with splits {names}, and none is "
                f"plainly the {role} split. Name one as '{p}:<split>', e.g. '{p}:{names[0]}'."
            )
        split = matches[0]
    if split not in splits:
        raise DataError(
            f"config key '{config_key}': '{p}' has no split '{split}'; its splits are {names}. "
            f"Name one as '{p}:<split>'."
        )
    for i, item in enumerate(splits[split], start=1):
        yield Row(f"{p}:{split}", i, dict(item))
