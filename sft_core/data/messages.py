"""Row formats -> chat messages: alpaca field mapping, `messages`, ShareGPT `conversations`.

Every rule that makes a row unusable raises a DataError naming file, row and field; the encoder
turns it into a bad row for the `on_bad_row` policy. The rule for conversations: roles must be
system/user/assistant (after the format's mapping), there must be an answer to train on and no
answer may be empty, and the last turn must not be an unanswered question. An assistant turn may
come first. A turn is read from its role, its content and an optional `weight` (OpenAI's
fine-tuning format: 0 keeps an assistant turn as context, untrained); a key that would change the
conversation or what is trained if dropped (UNREAD_TURN_KEYS) is refused, other keys are metadata;
so is a row key that carries part of the conversation (UNREAD_ROW_KEYS), except an alpaca row's
`history`, which is read. In every format, no content may hold a special token of the tokenizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from sft_core.data.sources import Row
from sft_core.errors import DataError

RowFormat = Literal["auto", "alpaca", "messages", "sharegpt"]

# A chat message: "role" and "content" (str), and "train" (bool) where the data's weight says
# whether an assistant turn is trained (absent: it is).
Message = dict[str, Any]

WEIGHT_KEY = "weight"
# Turn keys that carry part of the conversation (tool calls, reasoning, a speaker's name) or decide
# what is trained in other tools' formats: dropped, they would silently change what the model
# learns, so a turn holding one is a bad row. Any other key is metadata (WildChat's country,
# timestamp, ...) and is not read.
UNREAD_TURN_KEYS = (
    "tool_calls", "function_call", "tool_call_id", "tools",
    "reasoning_content", "reasoning", "thinking", "name",
    "train", "training", "loss", "mask", "trainable",
)  # fmt: skip
# Row keys that carry part of the conversation in other tools' formats: OpenAI's and ShareGPT's
# tool schemas, and LLaMA-Factory's alpaca `history` (read in alpaca rows: HISTORY_KEY).
UNREAD_ROW_KEYS = ("tools", "functions", "history")
# LLaMA-Factory's alpaca column of earlier exchanges: [[prompt, answer], ...], oldest first.
HISTORY_KEY = "history"

# An answer that is only an empty think block (Qwen3's "<think>\n\n</think>\n\n") says nothing: the
# block is the format's, so training it would teach an empty answer.
_EMPTY_THINK_ONLY = re.compile(r"\s*<think>\s*</think>\s*")


def empty_answer(text: str) -> str | None:
    """Why an answer's text cannot be trained on (empty, blank, or only an empty think block), or None."""
    if not text.strip():
        return "is empty" if not text else "is empty (only whitespace)"
    if _EMPTY_THINK_ONLY.fullmatch(text):
        return "holds only an empty <think></think> block"
    return None


# The roles a chat template knows; anything else would be rendered and silently never trained on.
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
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

    format: `alpaca` (user = prompt + "\\n" + query, assistant = response, optional system),
    `messages` (a list of {role, content}), `sharegpt` (`conversations` with {from, value}), or
    `auto` (alpaca when the prompt key is present and not null, else messages, else sharegpt).
    `system_key` also names a top-level system prompt of a messages/ShareGPT row.
    """

    prompt_key: str = "instruction"
    response_key: str = "output"
    query_key: str | None = None
    system_key: str | None = None
    format: RowFormat = "auto"


def row_format(data: dict[str, Any], fields: FieldMapping) -> str:
    if fields.format != "auto":
        return fields.format
    # A null or "" column is no column: Parquet and save_to_disk give every row the columns of all
    # rows, and a DataFrame's fillna("") writes "" where null was.
    if _set(data, fields.prompt_key):
        return "alpaca"
    if _set(data, "messages"):
        return "messages"
    return "sharegpt" if _set(data, "conversations") else "alpaca"


def _set(data: dict[str, Any], key: str) -> bool:
    return data.get(key) not in (None, "")


def unread_fields(data: dict[str, Any], fields: FieldMapping) -> list[str]:
    """The row's keys holding a value that its format does not read: metadata to the pipeline (an id,
    a source), or a column the mapping misses (Dolly's `context`), which the run reports."""
    kind = row_format(data, fields)
    if kind == "alpaca":
        read = {fields.prompt_key, fields.query_key, fields.response_key, fields.system_key, HISTORY_KEY}
    else:
        read = {"messages" if kind == "messages" else "conversations", fields.system_key}
    return [k for k, v in data.items() if k not in read and v not in (None, "", [], {})]


def row_to_messages(row: Row, fields: FieldMapping, reserved: re.Pattern[str] | None = None) -> list[Message]:
    """Map one row to chat messages; a missing or empty required field names file, row and field,
    and so does content that `reserved` (templates.forbidden_text) matches: a special token of the
    tokenizer, or a control character it cannot encode."""
    kind = row_format(row.data, fields)
    present = [k for k in (fields.prompt_key, "messages", "conversations") if _set(row.data, k)]
    if fields.format == "auto" and len(present) > 1:  # one would be read, the others dropped unseen
        raise DataError(
            f"{row.where}: fields {present} are all set, so `format: auto` cannot tell which one holds the "
            "conversation. Keep one per row, or set sft_train.data_args.format."
        )
    read = (HISTORY_KEY,) if kind == "alpaca" else ()
    unread = [k for k in UNREAD_ROW_KEYS if k not in read and row.data.get(k) not in (None, "", [], {})]
    if unread:
        raise DataError(
            f"{row.where}: field '{unread[0]}' holds a value this pipeline does not read in a {kind} row; "
            "training without it would change the conversation. Remove it from the data or set it to null."
        )
    if kind == "messages":
        turns = _checked_turns(row, "messages", "role", "content", MESSAGE_ROLES, reserved)
    elif kind == "sharegpt":
        turns = _checked_turns(row, "conversations", "from", "value", SHAREGPT_ROLES, reserved)
    else:
        return _alpaca(row, fields, reserved)
    system = _text(row, fields.system_key, "system_key", False, reserved) if fields.system_key else ""
    if system:
        if turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system})
        elif turns[0]["content"] != system:
            raise DataError(
                f"{row.where}: field '{fields.system_key}' (system_key) and the conversation's own system "
                "turn differ; keep one of them."
            )
    return turns


def _no_reserved(row: Row, field: str, text: str, reserved: re.Pattern[str] | None) -> str:
    """Content is text: a special token written in it would be tokenized as the control token
    itself, ending a turn or opening a forged one (with labels) where the data says so."""
    found = reserved.search(text) if reserved else None
    if found and found.lastgroup == "lost":
        raise DataError(
            f"{row.where}: field '{field}' contains the control character U+{ord(found.group()):04X}, which "
            "this tokenizer cannot encode: it would be dropped from the text unseen. Remove it from the "
            "data or write it differently."
        )
    if found:
        raise DataError(
            f"{row.where}: field '{field}' contains '{found.group()}', a special token of this tokenizer; "
            "it would be read as a control token (a forged turn boundary or label), not as text. "
            "Remove it from the data or write it differently."
        )
    return text


def _kind(value: object) -> str:
    """A JSON value's kind, for messages: 'null', 'a list', 'a number', ..."""
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def _text(row: Row, key: str, role: str, required: bool, reserved: re.Pattern[str] | None = None) -> str:
    value = row.data.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            state = "is missing" if key not in row.data else "is empty"
            raise DataError(
                f"{row.where}: field '{key}' ({role}) {state}. Every row needs it; "
                f"set {role} in the config if your data names it differently.{_wrapped_rows(row)}"
            )
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field '{key}' ({role}) must be a string, got {type(value).__name__}.")
    return _no_reserved(row, key, value, reserved)


def _wrapped_rows(row: Row) -> str:
    """A hint for a row that holds rows (a .json file's object {"data": [{...}, ...]}, read as one row)."""
    for key, value in row.data.items():
        rows = isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        if rows and key not in ("messages", "conversations"):
            return (f" Its field '{key}' holds a list of {len(value)} objects: if those are the rows, "
                    "give that list itself (or one object per line, as JSON lines).")  # fmt: skip
    return ""


def _alpaca(row: Row, fields: FieldMapping, reserved: re.Pattern[str] | None) -> list[Message]:
    prompt = _text(row, fields.prompt_key, "prompt_key", True, reserved)
    query = _text(row, fields.query_key, "query_key", False, reserved) if fields.query_key else ""
    response = _text(row, fields.response_key, "response_key", True, reserved)
    if why := empty_answer(response):
        raise DataError(f"{row.where}: field '{fields.response_key}' (response_key) {why}. Every answer is "
                        "trained on; fill it in or drop the row.")  # fmt: skip
    system = _text(row, fields.system_key, "system_key", False, reserved) if fields.system_key else ""
    messages = [{"role": "system", "content": system}] if system else []
    messages += _history(row, reserved)
    messages.append({"role": "user", "content": f"{prompt}\n{query}" if query else prompt})
    messages.append({"role": "assistant", "content": response})
    return messages


def _history(row: Row, reserved: re.Pattern[str] | None) -> list[Message]:
    """An alpaca row's earlier exchanges (LLaMA-Factory's `history`: [[prompt, answer], ...]) as
    user and assistant turns before its own; their answers are trained as any assistant turn."""
    pairs = row.data.get(HISTORY_KEY)
    if pairs in (None, ""):  # "": an empty CSV cell (a CSV cannot hold the list anyway)
        return []
    if not isinstance(pairs, list):
        raise DataError(
            f"{row.where}: field '{HISTORY_KEY}' must be a list of [prompt, answer] pairs, got {type(pairs).__name__}."
        )
    turns: list[Message] = []
    for j, pair in enumerate(pairs, start=1):
        field = f"{HISTORY_KEY}[{j}]"
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(f"{row.where}: field '{field}' must be a [prompt, answer] pair of strings.")
        if why := empty_answer(pair[1]):
            raise DataError(
                f"{row.where}: field '{field}[2]' (an assistant answer) {why}. Every answer is trained on; "
                "fill it in or drop the pair."
            )
        turns.append({"role": "user", "content": _no_reserved(row, f"{field}[1]", pair[0], reserved)})
        turns.append({"role": "assistant", "content": _no_reserved(row, f"{field}[2]", pair[1], reserved)})
    return turns


def _checked_turns(
    row: Row,
    key: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
    reserved: re.Pattern[str] | None = None,
) -> list[Message]:
    turns = row.data.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{row.where}: field '{key}' must be a non-empty list of {{{role_key}, {content_key}}} objects."
        )
    out = []
    for j, m in enumerate(turns, start=1):
        if not isinstance(m, dict):
            raise DataError(
                f"{row.where}: field '{key}[{j}]' is {_kind(m)}; expected an object with string "
                f"'{role_key}' and '{content_key}'."
            )
        for k in (role_key, content_key):
            if not isinstance(m.get(k), str):
                found = "missing" if k not in m else _kind(m[k])
                parts = " (content parts: give the text as one string)" if isinstance(m.get(k), list) else ""
                raise DataError(f"{row.where}: field '{key}[{j}].{k}' must be a string, got {found}{parts}.")
        # A null column is no column (Parquet gives every turn the keys of all turns).
        unread = [k for k in UNREAD_TURN_KEYS if m.get(k) not in (None, "", [], {})]
        if unread:
            raise DataError(
                f"{row.where}: field '{key}[{j}].{unread[0]}' holds a value this pipeline does not read (a "
                f"turn is trained from '{role_key}', '{content_key}' and '{WEIGHT_KEY}'); training without it "
                "would change the conversation or what is trained. Remove it from the data or set it to null."
            )
        role = roles.get(m[role_key])
        if role is None:
            raise DataError(
                f"{row.where}: field '{key}[{j}].{role_key}' is '{m[role_key]}'; expected one of {sorted(roles)}."
            )
        field = f"{key}[{j}].{content_key}"
        if role == "assistant" and (why := empty_answer(m[content_key])):  # as alpaca's response_key
            raise DataError(
                f"{row.where}: field '{field}' (an assistant answer) {why}. Every answer is trained on; "
                "fill it in or drop the turn."
            )
        message: Message = {"role": role, "content": _no_reserved(row, field, m[content_key], reserved)}
        if (train := _weight(row, f"{key}[{j}].{WEIGHT_KEY}", m.get(WEIGHT_KEY), role)) is not None:
            message["train"] = train
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{row.where}: field '{key}' has no assistant turn, so nothing would be trained on.")
    if not any(m["role"] == "assistant" and m.get("train", True) for m in out):
        raise DataError(
            f"{row.where}: every assistant turn of field '{key}' has {WEIGHT_KEY} 0, so nothing would be trained on."
        )
    if out[-1]["role"] == "user":
        raise DataError(
            f"{row.where}: field '{key}' ends with a user turn that has no answer; end it with the "
            "assistant's answer (or drop the last question)."
        )
    return out


def _weight(row: Row, field: str, value: Any, role: str) -> bool | None:
    """Whether a turn's `weight` trains it (None: no weight given). 0 or 1, as OpenAI's format has
    it; only an assistant turn can be trained, so another turn's weight may only be 0."""
    if value is None:
        return None
    if not isinstance(value, int | float) or value not in (0, 1):
        raise DataError(
            f"{row.where}: field '{field}' is {value!r}; a turn's weight is 0 (context, not trained) or 1 "
            "(trained). Weights between are not supported."
        )
    if value == 1 and role != "assistant":
        raise DataError(
            f"{row.where}: field '{field}' is 1 on a {role} turn; only assistant turns are trained."
        )
    return bool(value)
