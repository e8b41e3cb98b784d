"""Template spans -> labels: tokenize rendered conversations and keep ids only inside the
supervised character spans (the answers and their end-of-turn tokens, see templates.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sft_core.data import IGNORE_INDEX
from sft_core.data.templates import ChatTemplate, supervised_char_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def encode_messages(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    messages: list[dict[str, str]],
    where: str,
    supervise: str = "all_assistant_turns",
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation: labels keep ids only inside supervised spans."""
    text, spans = conversation_spans(tokenizer, template, messages, where, supervise)
    ids, labels = tokenize_with_labels(tokenizer, [text], [spans])[0]
    return ids.tolist(), labels.tolist()


def conversation_spans(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    messages: list[dict[str, str]],
    where: str,
    supervise: str,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the spans `supervise` keeps (every answer, or the last one)."""
    text, spans = supervised_char_spans(template, tokenizer, messages, where)
    return text, (spans[-1:] if supervise == "last_assistant_turn" else spans)


def tokenize_with_labels(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize a batch (the fast tokenizer's batch path) and label each token from the char spans.

    A token is supervised when it overlaps a span. A token can straddle the span start only when
    the template's generation prompt ends mid-word (e.g. "assistant: " + "Blue" -> " Blue"): the
    model must still produce it, so it is supervised.
    """
    backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer: skips python-side conversion
    if backend is None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            labels_from_offsets(i, o, sp)
            for i, o, sp in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True)
        ]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for e, sample_spans in zip(backend.encode_batch(texts, add_special_tokens=False), spans, strict=True):
        ids = np.array(e.ids, dtype=np.int32)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        for s0, s1 in sample_spans:
            first, last = e.char_to_token(s0), e.char_to_token(s1 - 1)
            if first is None or last is None:  # a span edge on a char no token covers: exact fallback
                return [
                    labels_from_offsets(x.ids, x.offsets, sp)
                    for x, sp in zip(
                        backend.encode_batch(texts, add_special_tokens=False), spans, strict=True
                    )
                ]
            labels[first : last + 1] = ids[first : last + 1]
        out.append((ids, labels))
    return out


def labels_from_offsets(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    ids_arr = np.asarray(ids, dtype=np.int32)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    keep = np.zeros(len(ids), dtype=bool)
    for s0, s1 in spans:
        keep |= (off[:, 1] > s0) & (off[:, 0] < s1)
    return ids_arr, np.where(keep, ids_arr, IGNORE_INDEX).astype(np.int32)
