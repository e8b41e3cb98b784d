"""Every bad row goes through `on_bad_row`, and no row is lost: rows read = encoded + rejected +
dropped, for a file mixing good rows with bad rows of every kind, each named by file, row and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sft_core.config_loader import load_config
from sft_core.data import IGNORE_INDEX
from sft_core.data.encode import EncodeStats, encode_files, encode_to_dir, iter_encoded
from sft_core.data.messages import FieldMapping
from sft_core.data.spec import EncodeSpec
from sft_core.errors import ConfigError, DataError

FIELDS = FieldMapping(query_key="input", system_key="system")
# ChatML that refuses a row whose content is "RAISE" the way real templates refuse (raise_exception).
RAISING = (
    "{% for m in messages %}{% if m['content'] == 'RAISE' %}{{ raise_exception('this template refuses the row') }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LONG = " ".join(["word"] * 300)


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# (line bytes, None for a good row / "drop" / the reason a bad row must name)
ROWS: list[tuple[bytes, str | None]] = [
    (line({"instruction": "a", "output": "b"}), None),
    (b'{"instruction": "broken", "output": \n', "not valid JSON"),
    (b"[1, 2]\n", "expected a JSON object, got list"),
    (b'{"instruction": "x\xff\xfe", "output": "y"}\n', "field 'instruction' is not valid UTF-8"),
    (b'{"instruction": "lone \\ud800", "output": "y"}\n', "field 'instruction' is not valid UTF-8"),
    (line({"instruction": "no answer"}), "field 'output' (response_key) is missing"),
    (line({"instruction": "q", "output": 5}), "field 'output' (response_key) must be a string"),
    (line({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}),
     "field 'messages[2].role' is 'bot'"),
    (line({"messages": [{"role": "user", "content": "hi"}]}), "has no assistant turn"),
    (line({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "?"}]}), "ends with a user turn"),
    (line({"instruction": "RAISE", "output": "z"}), "raising.jinja' failed on this row: TemplateError: this template refuses the row"),
    (line({"conversations": [{"from": "system", "value": "A"}, {"from": "human", "value": "q"},
                             {"from": "gpt", "value": "a"}], "system": "B"}), "field 'system' (system_key)"),
    (line({"instruction": "long", "output": LONG}), "drop"),
    (b"\n", "blank"),  # not a row
    (line({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey\n"}],
           "system": "Terse."}), None),
    (line({"messages": [{"role": "assistant", "content": "Ask me."}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4\n\n"}]}), None),
    (line({"instruction": "c", "input": "ctx", "output": "d", "system": "S"}), None),
    # A turn's weight (OpenAI's format): 0 keeps an answer as context. Keys that are null or empty
    # are no keys (Parquet gives every turn the keys of all turns); metadata (country) is not read;
    # a key that carries part of the conversation (tool_calls) would be lost.
    (line({"messages": [{"role": "user", "content": "q1", "name": None, "tool_calls": [], "country": "NZ"},
                        {"role": "assistant", "content": "bad", "weight": 0},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "good", "weight": 1}]}), None),
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}]}),
     "field 'messages[2].weight' is 0.5"),
    (line({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 0}]}),
     "every assistant turn of field 'conversations' has weight 0"),
    (line({"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}),
     "field 'messages[1].weight' is 1 on a user turn"),
    (line({"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "tool_calls": [{"id": "1", "type": "function"}]}]}),
     "field 'messages[2].tool_calls' holds a value this pipeline does not read"),
    # An answer that is only the format's empty think block would teach an empty answer.
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\n\n</think>\n\n"}]}),
     "field 'messages[2].content' (an assistant answer) holds only an empty <think></think> block"),
    (line({"instruction": "q", "output": " <think> </think>"}),
     "field 'output' (response_key) holds only an empty <think></think> block"),
    # OpenAI's content parts, and a null content: the message says what was found.
    (line({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "a"}]}),
     "field 'messages[1].content' must be a string, got a list (content parts: give the text as one string)"),
    (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}),
     "field 'messages[2].content' must be a string, got null"),
]  # fmt: skip
BAD = [i for i, (_, k) in enumerate(ROWS) if k not in (None, "drop", "blank")]


def mixed_file(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(
        b"\xef\xbb\xbf" + b"".join(raw for raw, _ in ROWS)
    )  # a UTF-8 BOM first: read, not rejected
    template = tmp_path / "raising.jinja"
    template.write_text(RAISING)
    return data, template


def spec_for(template: Path, on_bad_row: str = "skip") -> EncodeSpec:
    return EncodeSpec(64, str(template), FIELDS, length_policy="drop", on_bad_row=on_bad_row)


def test_a_mixed_file_loses_no_row_and_names_every_reason(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    data, template = mixed_file(tmp_path)
    stats = EncodeStats()
    encoded = list(iter_encoded([str(data)], tok, spec_for(template), stats))
    rows_in = sum(1 for _, kind in ROWS if kind != "blank")
    line_of = {i: kind for i, (_, kind) in enumerate(ROWS, start=1)}

    assert stats.rows == rows_in == len(encoded) + stats.rejected + stats.dropped
    assert [sample.row.index for sample in encoded] == [i for i, k in line_of.items() if k is None]
    assert [e["row"] for e in stats.report] == [i for i, k in line_of.items() if k == "drop"]
    rejected = {r["row"]: r["reason"] for r in stats.rejects}
    assert set(rejected) == {i for i, k in line_of.items() if k not in (None, "drop", "blank")}
    for i, reason in rejected.items():
        assert reason.startswith(f"{data}, ") and line_of[i] in reason, (i, reason)
    # The rejects keep the row as read (undecodable bytes shown escaped, never lost).
    assert "\\xff" in json.dumps(next(r for r in stats.rejects if r["row"] == 4)["data"])

    texts = {s.row.index: tok.decode(s.input_ids) for s in encoded}
    supervised = {s.row.index: tok.decode([t for t in s.labels if t != IGNORE_INDEX]) for s in encoded}
    assert texts[1].startswith("<|im_start|>user\na<|im_end|>")  # the BOM did not reach the text
    assert "<|im_start|>system\nTerse.<|im_end|>" in texts[15]  # ShareGPT's top-level system, via system_key
    assert supervised[15] == "hey\n<|im_end|>"  # the end-of-turn token after a trailing newline
    assert texts[16].startswith("<|im_start|>assistant\nAsk me.<|im_end|>")  # an assistant turn first
    assert supervised[16] == "Ask me.<|im_end|>4\n\n<|im_end|>"
    assert "assistant\nbad<|im_end|>" in texts[18] and supervised[18] == "good<|im_end|>"  # weight 0: context


def test_encode_to_dir_writes_the_rejects_file(tmp_path, smollm2_tokenizer):
    data, template = mixed_file(tmp_path)
    stats = encode_to_dir([str(data)], smollm2_tokenizer, spec_for(template), tmp_path / "out")
    lines = (tmp_path / "out" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["row"] for x in lines] == [r["row"] for r in stats.rejects] and len(lines) == len(
        BAD
    )
    assert len((tmp_path / "out" / "length_report.jsonl").read_text().splitlines()) == stats.dropped == 1


@pytest.mark.parametrize("index", BAD)
def test_with_on_bad_row_error_each_kind_stops_naming_file_row_and_field(tmp_path, smollm2_tokenizer, index):
    raw, reason = ROWS[index]
    data, template = tmp_path / "d.jsonl", tmp_path / "raising.jinja"
    template.write_text(RAISING)
    data.write_bytes(ROWS[0][0] + raw)
    with pytest.raises(DataError) as err:
        encode_files([str(data)], smollm2_tokenizer, spec_for(template, "error"))
    message = str(err.value)
    assert f"{data}, " in message and ("line 2" in message or "row 2" in message), message
    assert reason in message and "on_bad_row=skip" in message, message


def test_parquet_with_other_columns_lists_its_reasons_before_failing(tmp_path, smollm2_tokenizer):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list([{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]).to_parquet(
        str(path)
    )
    spec = EncodeSpec(64, "chatml", FIELDS, on_bad_row="skip")
    with pytest.raises(DataError) as err:
        encode_to_dir([str(path)], smollm2_tokenizer, spec, tmp_path / "out")
    assert "3 rows read, 3 bad rows skipped (3 x field 'instruction' (prompt_key) is missing" in str(
        err.value
    )
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["data"]["question"]) for r in rejects] == [(1, "q0"), (2, "q1"), (3, "q2")]
    path.with_name("broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: cannot be read as Parquet"):
        encode_files([str(path.with_name("broken.parquet"))], smollm2_tokenizer, spec)


def test_json_lines_in_a_json_file_with_a_broken_first_line(tmp_path, smollm2_tokenizer):
    path = tmp_path / "d.json"
    path.write_text(
        '{"instruction": "a", "output": \n{"instruction": "b", "output": "c"}\n{"instruction": "d", "output": "e"}\n'
    )
    data, stats = encode_files(
        [str(path)], smollm2_tokenizer, EncodeSpec(64, "chatml", FIELDS, on_bad_row="skip")
    )
    assert (len(data), stats.rejected, stats.rejects[0]["row"]) == (2, 1, 1)
    with pytest.raises(DataError, match=rf"{path}, line 1: not valid JSON"):
        encode_files([str(path)], smollm2_tokenizer, EncodeSpec(64, "chatml", FIELDS))
    # A JSON list is one value: a broken one stops with its line, whatever the policy.
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": }]')
    with pytest.raises(DataError, match=rf"{path}, line 2: not valid JSON"):
        encode_files([str(path)], smollm2_tokenizer, EncodeSpec(64, "chatml", FIELDS, on_bad_row="skip"))
    # A JSON list holding bytes that are not UTF-8: that row alone is bad.
    path.write_bytes(b'[{"instruction": "a\xff", "output": "b"}, {"instruction": "c", "output": "d"}]')
    data, stats = encode_files(
        [str(path)], smollm2_tokenizer, EncodeSpec(64, "chatml", FIELDS, on_bad_row="skip")
    )
    assert len(data) == 1 and "row 1: field 'instruction' is not valid UTF-8" in stats.rejects[0]["reason"]


def test_validation_data_args_are_honoured_for_the_validation_split(tmp_path, smollm2_tokenizer):
    cfg = load_config(
        "sft_config",
        ["+validation.data_args.on_bad_row=skip", "+validation.data_args.template=chatml",
         "+validation.data_args.length_policy=drop", "sft_train.data_args.supervise=last_assistant_turn"],
    )  # fmt: skip
    train, val = EncodeSpec.from_config(cfg, "train"), EncodeSpec.from_config(cfg, "validation")
    assert (train.on_bad_row, train.template, train.length_policy) == ("error", "native", "truncate")
    assert (val.on_bad_row, val.template, val.length_policy) == ("skip", "chatml", "drop")
    assert val.supervise == train.supervise == "last_assistant_turn"  # inherited: validation did not set it
    assert val.config_key == "validation.data_args.file_name"
    path = tmp_path / "val.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    data, stats = encode_files([str(path)], smollm2_tokenizer, val)
    assert len(data) == 1 and stats.rejected == 1
    with pytest.raises(DataError, match=r"sft_train\.data_args\.on_bad_row=skip"):
        encode_files([str(path)], smollm2_tokenizer, train)
    with pytest.raises(ConfigError, match=r"validation\.data_args\.template: unknown template 'nope'"):
        load_config("sft_config", ["+validation.data_args.template=nope"])
    # The way out a validation bad row names is an override Hydra takes, with or without the key set.
    strict = EncodeSpec.from_config(load_config("sft_config", []), "validation")
    with pytest.raises(DataError, match=r"\(to skip such rows: (\S+)\)") as told:
        encode_files([str(path)], smollm2_tokenizer, strict)
    given = re.search(r"to skip such rows: (\S+)\)", str(told.value)).group(1)
    for before in ([], ["+validation.data_args.on_bad_row=error"]):
        assert (
            EncodeSpec.from_config(load_config("sft_config", [*before, given]), "validation").on_bad_row
            == "skip"
        )


def test_a_built_in_template_whose_tokens_the_tokenizer_lacks_stops_in_preflight():
    from sft_core.preflight import preflight

    cfg = load_config("sft_config", ["+experiment=smoke", "global_template=llama3"])
    with pytest.raises(
        ConfigError, match=r"sft_train\.data_args\.template.*template 'llama3' writes <\|start_header_id\|>"
    ):
        preflight(cfg)
    preflight(
        load_config("sft_config", ["+experiment=smoke", "global_template=chatml"])
    )  # SmolLM2 has ChatML
