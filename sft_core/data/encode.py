"""Policies and encoding: rows -> (ids, labels) with the bad-row and length policies applied, every
decision counted. The pieces: sources.py reads rows, messages.py maps them to chat messages,
labels.py turns template spans into labels, store.py holds the arrays, spec.py the settings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sft_core.data import IGNORE_INDEX
from sft_core.data.labels import conversation_spans, tokenize_with_labels
from sft_core.data.messages import FieldMapping, Message, row_format, row_to_messages, unread_fields
from sft_core.data.sources import Row, read_rows
from sft_core.data.spec import EncodeSpec
from sft_core.data.store import EncodedData, write_jsonl
from sft_core.data.templates import (
    ChatTemplate,
    check_ends_turns,
    end_of_turn_id,
    forbidden_text,
    get_template,
)
from sft_core.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class EncodeStats:
    """Every row read is rejected (bad row) or gives its samples (one, or one per assistant turn with
    `each_assistant_turn_as_sample`), each kept or dropped (too long)."""

    rows: int = 0
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0  # samples that were cut (still counted in samples)
    dropped: int = 0  # samples
    rejected: int = 0  # rows
    report: list[dict[str, Any]] = field(default_factory=list)  # each truncated or dropped sample
    rejects: list[dict[str, Any]] = field(default_factory=list)  # each bad row, with its reason
    unread: Counter[str] = field(default_factory=Counter)  # key -> usable rows holding it unread
    unread_text: Counter[str] = field(default_factory=Counter)  # of those, alpaca rows where it holds text
    seen: Counter[str] = field(default_factory=Counter)  # query_key -> usable alpaca rows giving it a value

    def unread_summary(self, fields: FieldMapping) -> tuple[str, bool] | None:
        """('...' naming the fields no row's mapping read, with their row counts; whether that is
        likely a mistake: query_key set but in no row while an unread field holds text, as Dolly's
        `context`), or None when every field was read."""
        if not self.unread:
            return None
        names = ", ".join(f"'{k}' ({n} rows)" for k, n in self.unread.most_common())
        if fields.query_key and not self.seen[fields.query_key] and self.unread_text:
            text = [f"'{k}'" for k, _ in self.unread_text.most_common()]
            which = f"{text[0]} holds" if len(text) == 1 else f"one of {', '.join(text)} holds"
            return (
                f"fields not read: {names}, while query_key={fields.query_key!r} has a value in no "
                f"row; if {which} the query (or the system prompt), set query_key (system_key) to its "
                "name", True,
            )  # fmt: skip
        return f"fields not read (metadata, not trained on): {names}", False

    def reasons(self, top: int = 3) -> str:
        """The most common reject reasons, without the file/row prefix, for a one-line summary."""
        counts = Counter(r["reason"].split(": ", 1)[-1] for r in self.rejects)
        return "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(top))


@dataclass(frozen=True)
class Sample:
    """One encoded sample and where it comes from: its row, and the assistant turn it ends with
    when each turn is a sample of its own (`each_assistant_turn_as_sample`; else None)."""

    row: Row
    turn: int | None
    input_ids: np.ndarray
    labels: np.ndarray
    turns_dropped: int = 0  # oldest exchanges left out to fit (length_policy: drop_oldest_turns)
    full_tokens: int = 0  # its length with them, when some were

    @property
    def where(self) -> str:
        return self.row.where if self.turn is None else f"{self.row.where}, assistant turn {self.turn}"


_CHUNK = 256  # rows per batch: large enough for the batched tokenizer, small enough to stream

# (row, its samples, error): a row is rejected whole or gives all its samples.
Encoded = tuple[Row, "list[Sample]", "str | None"]


def _conversations(messages: list[Message], supervise: str) -> list[tuple[int | None, list[Message]]]:
    """The conversations a row trains, each with the assistant turn it ends with: the row itself
    (None), or (each_assistant_turn_as_sample) one per trained assistant turn, numbered among the
    row's assistant turns, ending with it."""
    if supervise != "each_assistant_turn_as_sample":
        return [(None, messages)]
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return [(k, messages[: i + 1]) for k, i in enumerate(answers, start=1) if messages[i].get("train", True)]


def _encode_chunk(
    rows: list[Row], tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, spec: EncodeSpec
) -> list[Encoded]:
    """(row, samples, error) for each row of a chunk; errors are returned, not raised, so the
    caller applies on_bad_row in row order."""
    prepared: list[
        tuple[Row, list[tuple[int | None, list[Message], str, list[tuple[int, int]]]], str | None]
    ] = []
    reserved = forbidden_text(tokenizer)
    # A sample of its own trains its last turn, rendered as inference renders that conversation.
    supervise = "last_assistant_turn" if spec.supervise == "each_assistant_turn_as_sample" else spec.supervise
    for row in rows:
        try:
            if row.error:
                raise DataError(f"{row.file}, {row.error}.")
            messages = row_to_messages(row, spec.fields, reserved)
            rendered = [
                (
                    turn,
                    conversation,
                    *conversation_spans(tokenizer, template, conversation, row.where, supervise),
                )
                for turn, conversation in _conversations(messages, spec.supervise)
            ]
            prepared.append((row, rendered, None))
        except DataError as err:
            prepared.append((row, [], str(err)))
    texts = [text for _, rendered, _ in prepared for _, _, text, _ in rendered]
    spans = [sample_spans for _, rendered, _ in prepared for _, _, _, sample_spans in rendered]
    encoded = iter(tokenize_with_labels(tokenizer, texts, spans) if texts else ())
    out: list[Encoded] = []
    for row, rendered, error in prepared:
        samples = [Sample(row, turn, *next(encoded)) for turn, _, _, _ in rendered]
        if spec.length_policy == "drop_oldest_turns" and error is None:
            try:
                samples = [
                    _without_oldest_turns(
                        s, conversation, tokenizer, template, supervise, spec.sequence_length
                    )
                    for s, (_, conversation, _, _) in zip(samples, rendered, strict=True)
                ]
            except DataError as err:
                samples, error = [], str(err)
        out.append((row, samples, error))
    return out


def _without_oldest_turns(
    sample: Sample,
    conversation: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    supervise: str,
    limit: int,
) -> Sample:
    """A sample longer than `limit` encoded again without its oldest exchanges (a user turn and the
    answer to it; the system prompt stays), one at a time, until it fits or only its last
    exchange is left (the length policy then cuts it as `truncate` does)."""
    ids, labels, dropped = sample.input_ids, sample.labels, 0
    while len(ids) > limit and (shorter := _oldest_exchange_dropped(conversation)) is not None:
        conversation, dropped = shorter, dropped + 1
        text, spans = conversation_spans(tokenizer, template, conversation, sample.row.where, supervise)
        ids, labels = tokenize_with_labels(tokenizer, [text], [spans])[0]
    if not dropped:
        return sample
    return Sample(sample.row, sample.turn, ids, labels, dropped, len(sample.input_ids))


def _oldest_exchange_dropped(conversation: list[Message]) -> list[Message] | None:
    """The conversation without its turns up to and including its first answer (the system prompt
    kept); None when no trained answer would be left."""
    head = conversation[:1] if conversation[0]["role"] == "system" else []
    body = conversation[len(head) :]
    first = next(i for i, m in enumerate(body) if m["role"] == "assistant")
    rest = body[first + 1 :]
    if not any(m["role"] == "assistant" and m.get("train", True) for m in rest):
        return None
    return head + rest


# Worker-process state for preprocessing_num_workers > 1 (set once per process by _init_worker).
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: PreTrainedTokenizerBase, spec: EncodeSpec) -> None:
    _WORKER.update(tokenizer=tokenizer, spec=spec, template=_template(tokenizer, spec))


def _encode_chunk_in_worker(rows: list[Row]) -> list[Encoded]:
    return _encode_chunk(rows, _WORKER["tokenizer"], _WORKER["template"], _WORKER["spec"])


def _template(tokenizer: PreTrainedTokenizerBase, spec: EncodeSpec) -> ChatTemplate:
    return get_template(spec.template, tokenizer, spec.supervise_empty_think)


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


Progress = Callable[[EncodeStats], None]


def iter_encoded(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    spec: EncodeSpec,
    stats: EncodeStats,
    workers: int = 1,
    progress: Progress | None = None,
) -> Iterator[Sample]:
    """Yield every usable sample in file order, applying the bad-row and length policies;
    `progress(stats)` after each chunk. With workers > 1 chunks are encoded in a process
    pool (spawned: safe inside Ray)."""
    template = _template(tokenizer, spec)  # an unknown template fails here, before any row is read
    check_ends_turns(template, tokenizer)
    end_token = _end_token_id(tokenizer, template) if spec.truncate_keep_end_token else None
    if workers > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, _init_worker, (tokenizer, spec)) as pool:
            for chunk in pool.imap(_encode_chunk_in_worker, _chunks(files, spec.config_key)):
                yield from _apply_policies(chunk, spec, end_token, stats)
                if progress:
                    progress(stats)
        return
    for rows in _chunks(files, spec.config_key):
        yield from _apply_policies(_encode_chunk(rows, tokenizer, template, spec), spec, end_token, stats)
        if progress:
            progress(stats)


def _end_token_id(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> int:
    """The id truncate_keep_end_token writes: the template's end-of-turn token, which the model must
    learn to stop with (eos where the probe could not tell: a template that refuses it)."""
    found = end_of_turn_id(template, tokenizer)
    return int(tokenizer.eos_token_id) if found is None else found


def _reject(row: Row, error: str, spec: EncodeSpec, stats: EncodeStats) -> None:
    """The on_bad_row policy: stop naming the row, or count and list it."""
    if spec.on_bad_row == "error":
        raise DataError(f"{error} (to skip such rows: {spec.override('on_bad_row')}=skip)")
    stats.rejected += 1
    stats.rejects.append({"file": row.file, "row": row.index, "reason": error, "data": row.data})


def _keep_end_token(
    where: str, ids: np.ndarray, labels: np.ndarray, end_token: int, limit: int
) -> str | None:
    """Write the end token over the last token of a cut answer, in place. Where that token was the
    answer's only one, the stub is left untrained if an earlier answer is (the sample keeps it as
    context), else the reason the row is bad (the sample would teach an empty answer)."""
    if labels[-1] == IGNORE_INDEX:  # the cut fell outside an answer: nothing to end
        return None
    if len(labels) < 2 or labels[-2] == IGNORE_INDEX:
        if (labels[1:-1] != IGNORE_INDEX).any():  # an earlier answer, whole
            labels[-1] = IGNORE_INDEX
            return None
        return (
            f"{where}: cut to sequence_length={limit} (truncate_keep_end_token), the last answer keeps "
            "no token of its own, only the end token, so it would teach an empty answer. Raise "
            "sequence_length, shorten the prompt, or use length_policy=drop."
        )
    ids[-1] = labels[-1] = end_token
    return None


def _apply_policies(
    chunk: list[Encoded], spec: EncodeSpec, end_token: int | None, stats: EncodeStats
) -> Iterator[Sample]:
    for row, samples, error in chunk:
        stats.rows += 1
        kept: list[Sample] = []
        report: list[dict[str, Any]] = []  # its cut or dropped samples
        for sample in samples:
            error = error or _fit(sample, spec, end_token, kept, report)
        if error is not None:  # the whole row: none of its samples is trained
            _reject(row, error, spec, stats)
            continue
        unread = unread_fields(row.data, spec.fields)
        stats.unread.update(unread)
        if row_format(row.data, spec.fields) == "alpaca":  # only there does query_key map a field
            stats.unread_text.update(k for k in unread if isinstance(row.data[k], str))
            if (query := spec.fields.query_key) and row.data.get(query) not in (None, ""):
                stats.seen[query] += 1
        stats.dropped += sum(1 for entry in report if entry["action"] == "dropped")
        stats.truncated += sum(
            1 for entry in report if entry["action"] in ("truncated", "oldest_turns_dropped")
        )
        stats.report += report
        yield from kept


def _fit(
    sample: Sample, spec: EncodeSpec, end_token: int | None, kept: list[Sample], report: list[dict[str, Any]]
) -> str | None:
    """The length policy for one sample: kept (maybe cut) or dropped, each cut or drop reported;
    the reason the row is bad if a cut leaves its answer nothing but the end token."""
    row, ids, labels, limit = sample.row, sample.input_ids, sample.labels, spec.sequence_length
    turn = {} if sample.turn is None else {"turn": sample.turn}
    entry = {
        "file": row.file,
        "row": row.index,
        **turn,
        "tokens": sample.full_tokens or len(ids),
        "sequence_length": limit,
    }
    if sample.turns_dropped:
        entry["turns_dropped"] = sample.turns_dropped
    if len(ids) > limit:
        if spec.length_policy == "error":
            raise DataError(
                f"{sample.where}: the sample has {len(ids)} tokens, more than sequence_length={limit} "
                f"({spec.args_key}.length_policy=error). Raise sequence_length or set "
                f"{spec.override('length_policy')}=truncate or drop."
            )
        if spec.length_policy in ("truncate", "drop_oldest_turns"):
            ids, labels = ids[:limit].copy(), labels[:limit].copy()
            if end_token is not None and (
                error := _keep_end_token(sample.where, ids, labels, end_token, limit)
            ):
                return error
        if spec.length_policy == "drop" or not (labels[1:] != IGNORE_INDEX).any():
            # Nothing left to learn from after the cut: counted and listed, never trained on.
            report.append({**entry, "action": "dropped"})
            return None
        report.append({**entry, "action": "truncated"})
    elif sample.turns_dropped:
        report.append({**entry, "action": "oldest_turns_dropped"})
    kept.append(Sample(row, sample.turn, ids, labels))
    return None


def encode_files(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    spec: EncodeSpec,
    limit: int | None = None,
    workers: int = 1,
    progress: Progress | None = None,
) -> tuple[EncodedData, EncodeStats]:
    """Encode every row of `files` (or the first `limit` usable ones); every policy decision is
    counted. No usable sample at all is an error that says why the rows were rejected."""
    all_ids: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    stats = EncodeStats()
    for sample in iter_encoded(files, tokenizer, spec, stats, workers, progress):
        all_ids.append(sample.input_ids)
        all_labels.append(sample.labels)
        stats.samples += 1
        stats.tokens += len(sample.input_ids)
        stats.supervised_tokens += int((sample.labels[1:] != IGNORE_INDEX).sum())
        if limit and stats.samples >= limit:
            break
    return EncodedData.from_samples(all_ids, all_labels), stats


def no_samples_message(
    files: list[str], config_key: str, stats: EncodeStats, rejects: Path | None = None
) -> str:
    where = f"no usable samples in {', '.join(files)} (config key '{config_key}')"
    if not stats.rows:
        return f"{where}: the file(s) hold no rows."
    why = f"{stats.rejected} bad rows skipped ({stats.reasons()}), " if stats.rejected else ""
    listed = f" Each rejected row is listed in {rejects}." if rejects is not None and stats.rejected else ""
    return f"{where}: {stats.rows} rows read, {why}{stats.dropped} too long and dropped.{listed}"


def encode_to_dir(
    files: list[str],
    tokenizer: PreTrainedTokenizerBase,
    spec: EncodeSpec,
    out: Path,
    workers: int = 1,
    progress: Progress | None = None,
) -> EncodeStats:
    """encode_files, stored in `out`: encoded.npz, length_report.jsonl, rejects.jsonl. The reports
    are written before a "no usable samples" error, so the reasons are there to read."""
    data, stats = encode_files(files, tokenizer, spec, workers=workers, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(stats.report, out / "length_report.jsonl")
    write_jsonl(stats.rejects, out / "rejects.jsonl")
    if not len(data):
        raise DataError(no_samples_message(files, spec.config_key, stats, out / "rejects.jsonl"))
    data.save(out / "encoded.npz")
    return stats
