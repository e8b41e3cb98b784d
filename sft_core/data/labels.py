"""Template spans -> labels: tokenize rendered conversations and keep ids only inside the
supervised character spans (the answers and their end-of-turn tokens, see templates.py)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from sft_core.data import IGNORE_INDEX
from sft_core.data.templates import ChatTemplate, supervised_char_spans

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from sft_core.data.messages import Message


def encode_messages(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    messages: list[Message],
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
    messages: list[Message],
    where: str,
    supervise: str,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the spans `supervise` keeps (every answer, or the last one)."""
    return supervised_char_spans(template, tokenizer, messages, where, supervise == "last_assistant_turn")


def tokenize_with_labels(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize a batch (the fast tokenizer's batch path) and keep labels only inside the spans.

    Each text is cut at its span edges and the pieces are tokenized apart, so no token crosses an
    edge: the text before an answer is tokenized as that prompt alone is at inference, and the
    answer as the tokens the model generates after it. Tokenized whole, BPE would merge across the
    start (the header's "\\n" with an answer's leading "\\n\\n", a prompt's trailing space with the
    first word) and train a token that no prompt at inference ends before.

    A tokenizer that changes the start of every input (a SentencePiece prefix space) cannot be cut;
    its texts are tokenized whole, and a token that crosses a span edge is supervised.
    """
    if not cuts_cleanly(tokenizer):
        return _tokenize_whole(tokenizer, texts, spans)
    pieces: list[str] = []
    supervised: list[bool] = []
    counts: list[int] = []
    for text, sample_spans in zip(texts, spans, strict=True):
        n, pos = len(pieces), 0
        for s0, s1 in sample_spans:
            if s0 < pos or s1 <= s0:
                raise ValueError(f"spans must be ordered, non-empty and apart: {sample_spans}")
            pieces += [text[pos:s0], text[s0:s1]]
            supervised += [False, True]
            pos = s1
        pieces.append(text[pos:])
        supervised.append(False)
        counts.append(len(pieces) - n)
    piece_ids = iter(zip(_token_ids(tokenizer, pieces), supervised, strict=True))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for count in counts:
        ids_parts, label_parts = [], []
        for ids, keep in itertools.islice(piece_ids, count):
            ids_parts.append(ids)
            label_parts.append(ids if keep else np.full(len(ids), IGNORE_INDEX, dtype=np.int32))
        out.append((np.concatenate(ids_parts), np.concatenate(label_parts)))
    return out


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[np.ndarray]:
    backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer: skips python-side conversion
    if backend is None:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [np.array(i, dtype=np.int32) for i in ids]


# Text a template writes around answers: a cut before a word, after newlines, before whitespace.
_PROBE = ("<|user|>\nHi there.\n<|assistant|>\n", "\n\n Blue sky, 42.", "\n", " again")


def cuts_cleanly(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizing the pieces of a text apart spells the same text as tokenizing it whole
    (byte-level BPE: yes; a tokenizer that prefixes every input with a space: no). Cached per tokenizer."""
    cache: tuple[int, bool] | None = getattr(tokenizer, "_sft_cuts_cleanly", None)
    if cache is None or cache[0] != len(tokenizer):
        whole = _decode(tokenizer, [int(i) for i in _token_ids(tokenizer, ["".join(_PROBE)])[0]])
        cut = _decode(tokenizer, [int(i) for piece in _token_ids(tokenizer, list(_PROBE)) for i in piece])
        cache = (len(tokenizer), whole == cut)
        tokenizer._sft_cuts_cleanly = cache
    return cache[1]


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert isinstance(text, str)  # one sequence in, one string out (typed for batches too)
    return text


def _tokenize_whole(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], spans: list[list[tuple[int, int]]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each text tokenized whole; a token is supervised when it overlaps a span."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        labels_from_offsets(i, o, sp)
        for i, o, sp in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True)
    ]


def labels_from_offsets(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    ids_arr = np.asarray(ids, dtype=np.int32)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    keep = np.zeros(len(ids), dtype=bool)
    for s0, s1 in spans:
        keep |= (off[:, 1] > s0) & (off[:, 0] < s1)
    return ids_arr, np.where(keep, ids_arr, IGNORE_INDEX).astype(np.int32)
