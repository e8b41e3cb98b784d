"""`sft preview` shows what a run would train on, for a person and for scripts."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


def test_preview_marks_only_the_answers(tmp_path):
    result = run_cli(["preview", "+experiment=smoke", "-n", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.count("── sample") == 2 and "supervised" in out
    marked = [chunk.split("»")[0] for chunk in out.split("«")[1:]]
    assert len(marked) == 2 and all(m.endswith("<|im_end|>") for m in marked)
    assert not any("<|im_start|>" in m or "SmolLM" in m for m in marked)


def test_text_in_the_data_cannot_fake_a_supervised_span_or_hide_itself_in_the_preview(tmp_path):
    """A prompt holding guillemets, a terminal control (ESC[8m hides what follows) or a bidi
    override is shown escaped: the preview shows what was encoded, and only answers are marked."""
    data = tmp_path / "d.jsonl"
    prompt = "«I will obey»\u001b[8m hidden instruction\u001b[0m \u202eevil"
    data.write_text(json.dumps({"instruction": prompt, "output": "Fine."}) + "\n")
    result = run_cli(
        ["preview", "+experiment=smoke", "-n", "1", f"sft_train.data_args.file_name={data}"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\u00abI will obey\\u00bb\\x1b[8m hidden instruction\\x1b[0m \\u202eevil" in out
    assert [chunk.split("»")[0] for chunk in out.split("«")[1:]] == ["Fine.<|im_end|>"]


def test_preview_json_gives_packed_rows_with_restarting_positions(tmp_path):
    result = run_cli(["preview", "+experiment=smoke", "-n", "4", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert sum(len(r["samples"]) for r in rows) == 4
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])
        assert r["position_ids"].count(0) == len(r["samples"])
    unpacked = run_cli(
        ["preview", "+experiment=smoke", "-n", "4", "--json", "sft_train.use_sequence_packing=false"],
        tmp_path,
    )
    assert unpacked.returncode == 0, unpacked.stderr[-2000:]
    samples = [json.loads(line) for line in unpacked.stdout.splitlines()]
    assert sorted((s["file"], s["row"]) for s in samples) == sorted(
        (x["file"], x["row"]) for r in rows for x in r["samples"]
    )
    assert sum(len(s["input_ids"]) for s in samples) == sum(len(r["input_ids"]) for r in rows)


def test_preview_says_how_many_rows_it_skipped_and_why(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "no answer"}\nnot json\n'
        '{"instruction": "c", "output": "d"}\n'
    )
    args = ["preview", "+experiment=smoke", "-n", "2", f"sft_train.data_args.file_name={data}"]
    result = run_cli([*args, "sft_train.data_args.on_bad_row=skip"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("── sample") == 2
    assert "skipped 2 bad row(s) of 4 read" in result.stderr
    assert "field 'output' (response_key) is missing" in result.stderr and "not valid JSON" in result.stderr


def test_preview_of_a_split_with_no_usable_sample_fails_as_a_run_would(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "hi", "output": ""}\n')
    empty = run_cli(
        ["preview", "+experiment=smoke", f"sft_train.data_args.file_name={tmp_path}/empty.jsonl"], tmp_path
    )
    assert empty.returncode == 2, empty.stdout + empty.stderr
    assert f"no usable samples in {tmp_path}/empty.jsonl" in empty.stderr and "hold no rows" in empty.stderr
    bad = run_cli(
        ["preview", "+experiment=smoke", f"validation.data_args.file_name={tmp_path}/bad.jsonl",
         "+validation.data_args.on_bad_row=skip", "--split", "validation"],
        tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "(config key 'validation.data_args.file_name'): 1 rows read, 1 bad rows skipped" in bad.stderr
    assert "field 'output' (response_key) is empty" in bad.stderr


@pytest.mark.parametrize("n", ["0", "-1"])
def test_preview_refuses_fewer_than_one_sample(n, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["preview", "+experiment=smoke", "-n", n])
    assert stop.value.code == 2
    assert f"sft preview: error: argument -n: must be at least 1, got {n}" in capsys.readouterr().err


def test_preview_of_the_validation_split_says_when_the_config_has_none(capsys):
    from flows.cli import main

    args = ["preview", "+experiment=smoke", "validation=null", "metric_for_best_model=loss"]
    assert main([*args, "--split", "validation"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sft: error: config key 'validation': this config has no validation split (validation is null "
        "or names no file); preview --split train, or set validation.data_args.file_name"
    )


def test_preview_names_the_fields_no_mapping_read(tmp_path):
    """Dolly's shape with the default mapping: `context` holds the query but query_key is 'input', so
    the question would be trained without its context; the preview says so, with row counts."""
    data = tmp_path / "dolly.jsonl"
    rows = [{"instruction": f"When was X{i} born?", "context": f"X{i} was born in 198{i}.",
             "output": f"198{i}.", "id": i} for i in range(3)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["preview", "+experiment=smoke", "-n", "3", f"sft_train.data_args.file_name={data}"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "fields not read: 'context' (3 rows), 'id' (3 rows), while query_key='input' has a value in no row; if 'context' holds"
        in result.stderr
    )
    mapped = run_cli([*args, "query_key=context"], tmp_path)
    assert mapped.returncode == 0, mapped.stderr[-2000:]
    assert "X0 was born in 1980." in mapped.stdout
    assert "fields not read (metadata, not trained on): 'id' (3 rows)" in mapped.stderr


def test_metadata_beside_messages_is_listed_without_a_warning(smollm2_tokenizer, tmp_path):
    """query_key maps an alpaca field only: an UltraChat-shaped file (`prompt`, `prompt_id` beside
    `messages`) reads every turn, and its other fields are metadata, not a misnamed query."""
    from sft_core.data.encode import encode_files
    from sft_core.data.messages import FieldMapping
    from sft_core.data.spec import EncodeSpec

    data = tmp_path / "ultrachat.jsonl"
    row = {"prompt": "q", "prompt_id": "ab12", "messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "a"}]}  # fmt: skip
    data.write_text(json.dumps(row) + "\n")
    fields = FieldMapping(query_key="input")
    _, stats = encode_files([str(data)], smollm2_tokenizer, EncodeSpec(64, "chatml", fields))
    assert stats.unread_summary(fields) == (
        "fields not read (metadata, not trained on): 'prompt' (1 rows), 'prompt_id' (1 rows)",
        False,
    )
