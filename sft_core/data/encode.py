"""Rows -> chat messages -> token ids + labels, with the length and bad-row policies applied and counted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sft_core.data import IGNORE_INDEX
from sft_core.data.sources import Row, read_rows
from sft_core.data.templates import ChatTemplate, get_template, supervised_char_spans
from sft_core.errors import DataError

if TYPE_CHECKING:
    from sft_core.config import SFTConfig

# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class FieldMapping:
    """How a row becomes a conversation.

    format: `alpaca` (the seed's field mapping: user = prompt + "\\n" + query, assistant = response,
    optional system), `messages` (a list of {role, content}), `sharegpt` (`conversations` with
    {from, value}), or `auto` (alpaca when the prompt key is present, else messages, else sharegpt).
    """

    prompt_key: str = "instruction"
    response_key: str = "output"
    query_key: str | None = None
    system_key: str | None = None
    format: str = "auto"


@dataclass(frozen=True)
class EncodeOptions:
    sequence_length: int
    length_policy: str = "truncate"  # truncate | drop | error
    on_bad_row: str = "error"  # error | skip (each skipped row is written to the rejects list)
    supervise: str = "all_assistant_turns"  # or last_assistant_turn
    config_key: str = "sft_train.data_args.file_name"
    end_token_id: int | None = None  # set to end a truncated answer with it (truncate_keep_end_token)


# The roles a chat template knows; anything else would be rendered and silently never trained on.
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def row_to_messages(row: Row, fields: FieldMapping) -> list[dict[str, str]]:
    """Map one row to chat messages; a missing or empty required field names file, row and field."""
    data = row.data
    kind = fields.format
    if kind == "auto":
        kind = (
            "alpaca"
            if fields.prompt_key in data
            else "messages"
            if "messages" in data
            else "sharegpt"
            if "conversations" in data
            else "alpaca"
        )
    if kind == "messages":
        return _checked_messages(row, data.get("messages"), "messages", "role", "content", MESSAGE_ROLES)
    if kind == "sharegpt":
        return _checked_messages(
            row, data.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES
        )

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


def _checked_messages(
    row: Row, turns: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[dict[str, str]]:
    """The turns as {role, content}; a role outside `roles` (rendered, it would be silently
    unsupervised), no answer at all, or a question left unanswered at the end is a bad row."""
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{row.where}: field '{key}' must be a non-empty list of {{{role_key}, {content_key}}} objects."
        )
    out = []
    for j, m in enumerate(turns, start=1):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get(role_key), str)
            or not isinstance(m.get(content_key), str)
        ):
            raise DataError(f"{row.where}: field '{key}[{j}]' needs string '{role_key}' and '{content_key}'.")
        role = roles.get(m[role_key])
        if role is None:
            raise DataError(
                f"{row.where}: field '{key}[{j}].{role_key}' is '{m[role_key]}'; expected one of {sorted(roles)}."
            )
        out.append({"role": role, "content": m[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{row.where}: field '{key}' has no assistant turn, so nothing would be trained on.")
    if out[-1]["role"] == "user":
        raise DataError(
            f"{row.where}: field '{key}' ends with a user turn that has no answer; end it with the "
            "assistant's answer (or drop the last question)."
        )
    return out


def encode_settings(cfg: SFTConfig, config_key: str) -> dict[str, Any]:
    """The part of the config that encoding depends on, as plain data (the pipeline's cache key)."""
    return {
        "template": cfg.template,
        "fields": {
            "prompt_key": cfg.prompt_key,
            "response_key": cfg.response_key,
            "query_key": cfg.query_key,
            "system_key": cfg.system_key,
            "format": cfg.sft_train.data_args.format,
        },
        "on_bad_row": cfg.sft_train.data_args.on_bad_row,
        "supervise": cfg.sft_train.data_args.supervise,
        "supervise_empty_think": cfg.sft_train.data_args.supervise_empty_think,
        "truncate_keep_end_token": cfg.sft_train.data_args.truncate_keep_end_token,
        "sequence_length": cfg.sequence_length,
        "length_policy": cfg.sft_train.data_args.length_policy,
        "config_key": config_key,
    }


def encoder_from_settings(
    settings: dict[str, Any], tokenizer: Any
) -> tuple[ChatTemplate, FieldMapping, EncodeOptions]:
    """What `encode_settings` describes, built for `iter_encoded`: the one way a run and `sft
    preview` turn the config into an encoder."""
    template = get_template(settings["template"], tokenizer, settings["supervise_empty_think"])
    end_token = tokenizer.eos_token_id if settings["truncate_keep_end_token"] else None
    opts = EncodeOptions(
        settings["sequence_length"],
        settings["length_policy"],
        settings["on_bad_row"],
        settings["supervise"],
        settings["config_key"],
        end_token,
    )
    return template, FieldMapping(**settings["fields"]), opts


@dataclass
class EncodeStats:
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    rejected: int = 0
    report: list[dict[str, Any]] = field(default_factory=list)  # each truncated or dropped sample
    rejects: list[dict[str, Any]] = field(default_factory=list)  # each bad row, with its reason


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
    tokenizer: Any,
    template: ChatTemplate,
    messages: list[dict[str, str]],
    where: str,
    supervise: str = "all_assistant_turns",
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation: labels keep ids only inside supervised spans."""
    text, spans = _spans(tokenizer, template, messages, where, supervise)
    ids, labels = _tokenize_with_labels(tokenizer, [text], [spans])[0]
    return ids.tolist(), labels.tolist()


def _spans(
    tokenizer: Any, template: ChatTemplate, messages: list[dict[str, str]], where: str, supervise: str
):
    text, spans = supervised_char_spans(template, tokenizer, messages, where)
    return text, (spans[-1:] if supervise == "last_assistant_turn" else spans)


def _tokenize_with_labels(
    tokenizer: Any, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[list[int], list[int]]]:
    """Tokenize a batch (the fast tokenizer's batch path) and label each token from the char spans.

    A token is supervised when it overlaps a span. A token can straddle the span start only when
    the template's generation prompt ends mid-word (e.g. "assistant: " + "Blue" -> " Blue"): the
    model must still produce it, so it is supervised.
    """
    backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer: skips python-side conversion
    if backend is None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            _labels_from_offsets(i, o, sp)
            for i, o, sp in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True)
        ]
    out = []
    for e, sample_spans in zip(backend.encode_batch(texts, add_special_tokens=False), spans, strict=True):
        ids = np.array(e.ids, dtype=np.int32)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        for s0, s1 in sample_spans:
            first, last = e.char_to_token(s0), e.char_to_token(s1 - 1)
            if first is None or last is None:  # a span edge on a char no token covers: exact fallback
                return [
                    _labels_from_offsets(x.ids, x.offsets, sp)
                    for x, sp in zip(
                        backend.encode_batch(texts, add_special_tokens=False), spans, strict=True
                    )
                ]
            labels[first : last + 1] = ids[first : last + 1]
        out.append((ids, labels))
    return out


def _labels_from_offsets(
    ids: list[int], offsets: list, spans: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    ids_arr = np.asarray(ids, dtype=np.int32)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    keep = np.zeros(len(ids), dtype=bool)
    for s0, s1 in spans:
        keep |= (off[:, 1] > s0) & (off[:, 0] < s1)
    return ids_arr, np.where(keep, ids_arr, IGNORE_INDEX).astype(np.int32)


_CHUNK = 256  # rows per batch: large enough for the batched tokenizer, small enough to stream


def _encode_chunk(
    rows: list[Row], tokenizer: Any, template: ChatTemplate, fields: FieldMapping, supervise: str
) -> list[tuple[Row, list[int] | None, list[int] | None, str | None]]:
    """(row, ids, labels, error) for each row of a chunk; errors are returned, not raised, so the
    caller applies on_bad_row in row order."""
    prepared: list[tuple[Row, str | None, list | None, str | None]] = []
    for row in rows:
        try:
            if row.error:
                raise DataError(f"{row.file}, {row.error}.")
            text, spans = _spans(tokenizer, template, row_to_messages(row, fields), row.where, supervise)
            prepared.append((row, text, spans, None))
        except DataError as err:
            prepared.append((row, None, None, str(err)))
    good = [p for p in prepared if p[3] is None]
    encoded = (
        iter(_tokenize_with_labels(tokenizer, [p[1] for p in good], [p[2] for p in good]))
        if good
        else iter(())
    )
    result = []
    for row, *_, error in prepared:
        if error is None:
            ids, labels = next(encoded)
            result.append((row, ids, labels, None))
        else:
            result.append((row, None, None, error))
    return result


# Worker-process state for preprocessing_num_workers > 1 (set once per process by _init_worker).
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, template: ChatTemplate, fields: FieldMapping, supervise: str) -> None:
    _WORKER.update(tokenizer=tokenizer, template=template, fields=fields, supervise=supervise)


def _encode_chunk_in_worker(rows: list[Row]) -> list:
    w = _WORKER
    return _encode_chunk(rows, w["tokenizer"], w["template"], w["fields"], w["supervise"])


def _chunks(files: list[str], config_key: str) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for file in files:
        for row in read_rows(file, config_key):
            chunk.append(row)
            if len(chunk) == _CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def iter_encoded(
    files: list[str],
    tokenizer: Any,
    template: ChatTemplate,
    fields: FieldMapping,
    opts: EncodeOptions,
    stats: EncodeStats,
    workers: int = 1,
) -> Iterator[tuple[Row, list[int], list[int]]]:
    """Yield (row, ids, labels) for every usable row in file order, applying the bad-row and length
    policies. With workers > 1 chunks are encoded in a process pool (spawned: safe inside Ray)."""
    if workers > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, _init_worker, (tokenizer, template, fields, opts.supervise)) as pool:
            for chunk in pool.imap(_encode_chunk_in_worker, _chunks(files, opts.config_key)):
                yield from _apply_policies(chunk, opts, stats)
        return
    for rows in _chunks(files, opts.config_key):
        yield from _apply_policies(
            _encode_chunk(rows, tokenizer, template, fields, opts.supervise), opts, stats
        )


def _apply_policies(
    chunk: list[tuple[Row, list[int] | None, list[int] | None, str | None]],
    opts: EncodeOptions,
    stats: EncodeStats,
) -> Iterator[tuple[Row, list[int], list[int]]]:
    for row, ids, labels, error in chunk:
        if error is not None:
            if opts.on_bad_row == "error":
                raise DataError(error)
            stats.rejected += 1
            stats.rejects.append({"file": row.file, "row": row.index, "reason": error, "data": row.data})
            continue
        assert ids is not None and labels is not None
        if len(ids) > opts.sequence_length:
            entry = {
                "file": row.file,
                "row": row.index,
                "tokens": len(ids),
                "sequence_length": opts.sequence_length,
            }
            if opts.length_policy == "error":
                raise DataError(
                    f"{row.where}: the sample has {len(ids)} tokens, more than sequence_length={opts.sequence_length} "
                    "(sft_train.data_args.length_policy=error). Raise sequence_length or use truncate/drop."
                )
            if opts.length_policy == "truncate":
                ids, labels = ids[: opts.sequence_length].copy(), labels[: opts.sequence_length].copy()
                if opts.end_token_id is not None and labels[-1] != IGNORE_INDEX:
                    ids[-1] = labels[-1] = opts.end_token_id
            if opts.length_policy == "drop" or not any(lab != IGNORE_INDEX for lab in labels[1:]):
                # Nothing left to learn from after the cut: counted and listed, never trained on.
                stats.dropped += 1
                stats.report.append({**entry, "action": "dropped"})
                continue
            stats.truncated += 1
            stats.report.append({**entry, "action": "truncated"})
        yield row, ids, labels


def encode_files(
    files: list[str],
    tokenizer: Any,
    template: ChatTemplate,
    fields: FieldMapping,
    sequence_length: int,
    length_policy: str = "truncate",
    config_key: str = "sft_train.data_args.file_name",
    on_bad_row: str = "error",
    supervise: str = "all_assistant_turns",
    limit: int | None = None,
    workers: int = 1,
    keep_end_token: bool = False,
) -> tuple[EncodedData, EncodeStats]:
    """Encode every row of `files` (or the first `limit` usable ones); every policy decision is counted."""
    end_token = tokenizer.eos_token_id if keep_end_token else None
    opts = EncodeOptions(sequence_length, length_policy, on_bad_row, supervise, config_key, end_token)
    all_ids: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    stats = EncodeStats()
    for _row, ids, labels in iter_encoded(files, tokenizer, template, fields, opts, stats, workers):
        all_ids.append(np.asarray(ids, dtype=np.int32))
        all_labels.append(np.asarray(labels, dtype=np.int32))
        stats.samples += 1
        stats.tokens += len(ids)
        stats.supervised_tokens += int((all_labels[-1][1:] != IGNORE_INDEX).sum())
        if limit and stats.samples >= limit:
            break
    if not all_ids:
        raise DataError(f"no usable samples in {', '.join(files)} (config key '{config_key}').")
    offsets = np.zeros(len(all_ids) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in all_ids], out=offsets[1:])
    data = EncodedData(np.concatenate(all_ids), np.concatenate(all_labels), offsets)
    return data, stats


def write_jsonl(entries: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for entry in entries:
            f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
