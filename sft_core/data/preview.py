"""`sft preview`: show encoded samples with the supervised spans marked, to check a template.

Supervised tokens are shown in green on a terminal, or between «guillemets» otherwise::

    <|im_start|>user
    Capital of France?<|im_end|>
    <|im_start|>assistant
    «Paris.<|im_end|>»
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, NotRequired, TypedDict

from sft_core.config import SFTConfig
from sft_core.data import IGNORE_INDEX
from sft_core.data.encode import EncodeStats, iter_encoded, no_samples_message
from sft_core.data.messages import FieldMapping
from sft_core.data.packing import build_row, plan_rows
from sft_core.data.spec import EncodeSpec
from sft_core.data.store import EncodedData
from sft_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GREEN, RESET = "\x1b[30;42m", "\x1b[0m"
# Shown as escapes, never written raw: the data's own terminal controls (ESC[8m hides what follows)
# and bidi overrides would make the preview show other text than was encoded, and its guillemets
# would fake a supervised span.
_UNSHOWN = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F) if chr(c) not in "\n\t"},
    **{c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x61C, 0x200E, 0x200F, *range(0x202A, 0x202F),
                                   *range(0x2066, 0x206A))},
}  # fmt: skip
_GUILLEMETS = {ord("«"): "\\u00ab", ord("»"): "\\u00bb"}


class Shown(TypedDict):
    """One encoded sample as the preview shows it (and prints it with --json)."""

    file: str
    row: int
    turn: NotRequired[int]  # the assistant turn it ends with (each_assistant_turn_as_sample)
    input_ids: list[int]
    labels: list[int]


def encode_preview(
    cfg: SFTConfig, tokenizer: PreTrainedTokenizerBase, n: int, split: str = "train"
) -> tuple[list[Shown], EncodeStats]:
    """The first `n` usable samples of the split, encoded exactly as training encodes them, and
    the counts of the rows read up to there (skipped bad rows, dropped samples). A split without
    any usable sample is the DataError a run would stop with."""
    files = cfg.sft_train.data_args.files() if split == "train" else cfg.validation_files
    if not files:  # only validation can have none (the config requires training data)
        raise ConfigError(
            "config key 'validation': this config has no validation split (validation is null or names "
            "no file); preview --split train, or set validation.data_args.file_name"
        )
    samples: list[Shown] = []
    stats = EncodeStats()
    spec = EncodeSpec.from_config(cfg, split)
    encoded = iter_encoded(files, tokenizer, spec, stats)
    for sample in encoded:
        shown: Shown = {
            "file": sample.row.file,
            "row": sample.row.index,
            "input_ids": [int(i) for i in sample.input_ids],
            "labels": [int(x) for x in sample.labels],
        }
        if sample.turn is not None:
            shown["turn"] = sample.turn
        samples.append(shown)
        if len(samples) >= n:
            break
    if not samples:
        raise DataError(no_samples_message(files, spec.config_key, stats))
    return samples, stats


def skipped_summary(stats: EncodeStats, fields: FieldMapping) -> list[str]:
    """What the preview passed over on its way to the samples shown, and why."""
    lines = []
    if unread := stats.unread_summary(fields):
        lines.append(f"in the rows shown, {unread[0]}")
    if stats.rejected:
        lines.append(f"skipped {stats.rejected} bad row(s) of {stats.rows} read: {stats.reasons(top=5)}")
    if stats.dropped:
        lines.append(f"dropped {stats.dropped} sample(s) longer than sequence_length (length_policy)")
    if stats.truncated:
        history = sum(1 for r in stats.report if r.get("turns_dropped"))
        cut = f" ({history} by their oldest turns)" if history else ""
        lines.append(f"truncated {stats.truncated} sample(s) to sequence_length{cut}")
    return lines


def render(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int], color: bool) -> str:
    """Decode runs of supervised / unsupervised tokens, marking the supervised runs."""
    out: list[str] = []
    run: list[int] = []
    supervised: bool | None = None
    for token, label in zip(ids, labels, strict=True):
        flag = label != IGNORE_INDEX
        if flag != supervised and run:
            out.append(_mark(_decode(tokenizer, run), supervised, color))
            run = []
        supervised = flag
        run.append(token)
    if run:
        out.append(_mark(_decode(tokenizer, run), supervised, color))
    return "".join(out)


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = tokenizer.decode(ids)
    assert isinstance(text, str)  # one sequence decodes to one string (the annotation covers batches)
    return text


def _mark(text: str, supervised: bool | None, color: bool) -> str:
    text = text.translate(_UNSHOWN if color else {**_UNSHOWN, **_GUILLEMETS})
    if not supervised:
        return text
    return f"{GREEN}{text}{RESET}" if color else f"«{text}»"


def preview_lines(
    cfg: SFTConfig,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Shown],
    as_json: bool,
    color: bool,
) -> Iterator[str]:
    if as_json:
        if cfg.sft_train.use_sequence_packing:
            yield from _packed_json(cfg, samples)
        else:
            for s in samples:
                yield json.dumps(s)
        return
    for i, s in enumerate(samples, start=1):
        supervised = sum(1 for lab in s["labels"] if lab != IGNORE_INDEX)
        turn = f", assistant turn {s['turn']}" if "turn" in s else ""
        yield (
            f"── sample {i}: {s['file']}, row {s['row']}{turn} · {len(s['input_ids'])} tokens, "
            f"{supervised} supervised"
        )
        yield render(tokenizer, s["input_ids"], s["labels"], color)


def _packed_json(cfg: SFTConfig, samples: list[Shown]) -> Iterator[str]:
    import numpy as np

    lengths = [len(s["input_ids"]) for s in samples]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = EncodedData(
        np.concatenate([np.asarray(s["input_ids"], dtype=np.int32) for s in samples]),
        np.concatenate([np.asarray(s["labels"], dtype=np.int32) for s in samples]),
        offsets,
    )
    plan = plan_rows(data, cfg.sequence_length, packing=True)
    for row in plan.rows:
        ids, labels, positions = build_row(data, row)
        yield json.dumps({
            "samples": [_origin(samples[i]) for i in row],
            "input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": positions.tolist(),
        })  # fmt: skip


def _origin(shown: Shown) -> dict[str, str | int]:
    """Where a sample comes from: file, row, and its assistant turn when it has one."""
    turn = {"turn": shown["turn"]} if "turn" in shown else {}
    return {"file": shown["file"], "row": shown["row"], **turn}
