"""Data files as they arrive: gzip-compressed, a saved DatasetDict, files joined with `cat`, rows
nested absurdly deep. Each reads like its plain form, or is a bad row / an error naming file and row."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from sft_core.data import IGNORE_INDEX
from sft_core.data.encode import encode_files
from sft_core.data.messages import FieldMapping
from sft_core.data.sources import count_rows
from sft_core.data.spec import EncodeSpec
from sft_core.errors import DataError

ROWS = [{"instruction": "Capital of France?", "output": "Paris."}, {"instruction": "2+2?", "output": "4"}]
BROKEN = b'{"instruction": "broken", "output": \n'
VALIDATION_KEY = "validation.data_args.file_name"


def spec(**kw) -> EncodeSpec:
    return EncodeSpec(256, "chatml", FieldMapping(), **kw)


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def supervised_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def answers(tok, files: list[str], **kw) -> list[str]:
    """The supervised text of each sample encoded from `files`."""
    data, _ = encode_files(files, tok, spec(**kw))
    return [supervised_text(tok, *data.sample(k)) for k in range(len(data))]


def test_a_gzip_compressed_data_file_reads_like_the_plain_file(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    (tmp_path / "plain.jsonl").write_bytes(jsonl(ROWS))
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(jsonl(ROWS)))
    (tmp_path / "train.json.gz").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    (tmp_path / "named.jsonl").write_bytes(gzip.compress(jsonl(ROWS)))  # gzip by its bytes, not its name
    expected = answers(tok, [str(tmp_path / "plain.jsonl")])
    assert expected == ["Paris.<|im_end|>", "4<|im_end|>"]
    for name in ("train.jsonl.gz", "train.json.gz", "named.jsonl"):
        assert answers(tok, [str(tmp_path / name)]) == expected, name
    assert count_rows(str(tmp_path / "named.jsonl")) is None  # not its compressed lines

    # A bad row in a compressed file is named by the file and its line number.
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(jsonl(ROWS[:1]) + BROKEN + jsonl(ROWS[1:])))
    _, stats = encode_files([str(bad)], tok, spec(on_bad_row="skip"))
    assert stats.samples == 2 and [(r["file"], r["row"]) for r in stats.rejects] == [(str(bad), 2)]
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(jsonl(ROWS * 50))[:-20])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: cannot be read as gzip"):
        encode_files([str(cut)], tok, spec())


def test_a_saved_dataset_dict_is_read_by_split(tmp_path, smollm2_tokenizer):
    import datasets

    tok = smollm2_tokenizer
    folder = tmp_path / "dict"
    splits = {"train": ROWS[:1], "validation": ROWS[1:], "test": [{"instruction": "q", "output": "held out"}]}
    saved = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    saved.save_to_disk(str(folder))
    assert answers(tok, [f"{folder}:test"]) == ["held out<|im_end|>"]  # as hub ids name a split
    # A bare folder takes the split named for the data's role.
    assert answers(tok, [str(folder)]) == ["Paris.<|im_end|>"]
    assert answers(tok, [str(folder)], config_key=VALIDATION_KEY) == ["4<|im_end|>"]
    with pytest.raises(DataError, match=r"no split 'tset'; its splits are \['train', 'validation', 'test'\]"):
        encode_files([f"{folder}:tset"], tok, spec())

    # No split named for the role: the error lists the splits and says how to pick one.
    other = tmp_path / "other"
    datasets.DatasetDict({"a": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(other))
    with pytest.raises(DataError, match=r"'validation\.data_args\.file_name'.*splits \['a'\].*other:<split>"):
        encode_files([str(other)], tok, spec(config_key=VALIDATION_KEY))
    _, stats = encode_files([f"{other}:a"], tok, spec(on_bad_row="skip"))
    assert stats.samples == 2


def deep_row(depth: int) -> bytes:
    """An alpaca row whose `messages` column holds a list nested `depth` levels deep."""
    return b'{"instruction": "q", "output": "a", "messages": ' + b"[" * depth + b"]" * depth + b"}\n"


def test_a_row_nested_absurdly_deep_is_a_bad_row_naming_file_and_row(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    f = tmp_path / "deep.jsonl"
    # Too deep for the JSON parser itself; deep enough that pickling it to a worker process fails.
    f.write_bytes(jsonl(ROWS[:1]) + deep_row(10_000) + deep_row(600) + jsonl(ROWS[1:]))
    _, stats = encode_files([str(f)], tok, spec(on_bad_row="skip"))
    assert stats.samples == 2 and [r["row"] for r in stats.rejects] == [2, 3]
    assert all("nested more than 100 levels deep" in r["reason"] for r in stats.rejects)
    _, in_workers = encode_files([str(f)], tok, spec(on_bad_row="skip"), workers=2)
    assert in_workers.rejects == stats.rejects
    with pytest.raises(DataError, match=r"deep\.jsonl, line 2: lists/objects nested more than 100"):
        encode_files([str(f)], tok, spec())

    # A JSON list is read whole: one such row stops it, naming the file.
    listed = tmp_path / "deep.json"
    listed.write_text("[" + json.dumps(ROWS[0]) + ", " + deep_row(10_000).decode() + "]")
    with pytest.raises(DataError, match=r"deep\.json: lists/objects nested too deep to read"):
        encode_files([str(listed)], tok, spec())


def test_a_bom_at_the_start_of_any_line_is_skipped_and_row_numbers_stay(tmp_path, smollm2_tokenizer):
    bom = b"\xef\xbb\xbf"
    f = tmp_path / "joined.jsonl"  # `cat a.jsonl b.jsonl`, each written with a BOM
    f.write_bytes(bom + jsonl(ROWS[:1]) + bom + jsonl(ROWS[1:]) + BROKEN + bom + b"\n")
    _, stats = encode_files([str(f)], smollm2_tokenizer, spec(on_bad_row="skip"))
    assert stats.samples == 2 and [r["row"] for r in stats.rejects] == [3]
    assert count_rows(str(f)) == stats.rows == 3


def test_the_cache_key_of_a_dataset_dict_split_follows_its_contents(tmp_path):
    import datasets

    from tasks.caching import file_digest

    folder = tmp_path / "dict"

    def save(train: list[dict]) -> None:
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(train), "validation": datasets.Dataset.from_list(ROWS)}
        ).save_to_disk(str(folder))

    save(ROWS[:1])
    before = file_digest(f"{folder}:train")
    assert not before.startswith("missing:") and before != file_digest(f"{folder}:validation")
    save(ROWS[1:])
    assert file_digest(f"{folder}:train") != before


def test_csv_and_tsv_rows_are_read_by_their_header_and_numbered_by_line(tmp_path, smollm2_tokenizer):
    """A header names the columns; a quoted value may span lines (the next row is numbered by the
    line it starts on, as an editor shows it); a record whose field count differs from the header's
    is a bad row; a BOM, CRLF line ends and gzip read as in the plain file."""
    from sft_core.data.encode import EncodeStats, iter_encoded

    csv_text = (
        "\ufeffinstruction,input,output\r\n"
        "Capital of France?,,Paris.\r\n"
        '"Say ""hi"", twice",,"hi,\nhi"\r\n'  # quotes, a comma and a newline inside values
        "one,two,three,four\r\n"  # four fields under three columns
        "\r\n"  # a blank line: no row
        "2+2?,in,4\r\n"
    )
    plain = tmp_path / "rows.csv"
    plain.write_text(csv_text, encoding="utf-8", newline="")
    packed = tmp_path / "rows.csv.gz"
    packed.write_bytes(gzip.compress(csv_text.encode()))
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("instruction\toutput\nCapital of France?\tParis.\n2+2?\t4\n", encoding="utf-8")
    fields = FieldMapping(query_key="input")
    for path in (plain, packed):
        stats = EncodeStats()
        spec = EncodeSpec(256, "chatml", fields, on_bad_row="skip")
        samples = list(iter_encoded([str(path)], smollm2_tokenizer, spec, stats))
        assert [s.row.index for s in samples] == [2, 3, 7]
        assert [supervised_text(smollm2_tokenizer, s.input_ids, s.labels) for s in samples] == [
            "Paris.<|im_end|>", "hi,\nhi<|im_end|>", "4<|im_end|>",
        ]  # fmt: skip
        assert 'Say "hi", twice' in smollm2_tokenizer.decode(samples[1].input_ids)
        assert "2+2?\nin" in smollm2_tokenizer.decode(samples[2].input_ids)  # query_key joined
        assert [(r["row"], r["reason"]) for r in stats.rejects] == [
            (5, f"{path}, line 5: 4 fields, but the header names 3 columns.")
        ]
    assert answers(smollm2_tokenizer, [str(tsv)]) == ["Paris.<|im_end|>", "4<|im_end|>"]
    (tmp_path / "dup.csv").write_text("output,output\na,b\n")
    with pytest.raises(
        DataError, match=r"dup.csv, line 1: the header \['output', 'output'\] must name each column once"
    ):
        answers(smollm2_tokenizer, [str(tmp_path / "dup.csv")])


def test_csv_quoting_is_strict_and_a_bad_record_keeps_its_lines(tmp_path, smollm2_tokenizer):
    """A lenient CSV reader drops quote marks from `"Yes," she said.` and lets an unclosed quote
    turn the rest of the file into one answer; both are bad rows here, named by line, with their
    text kept. A record of blank values is a row (rejected, counted), only an empty line is none,
    and a U+FEFF inside a quoted value is text (only the header's BOM is skipped)."""
    from sft_core.data.encode import EncodeStats, iter_encoded

    tsv = tmp_path / "quotes.tsv"
    tsv.write_bytes(
        b"\xef\xbb\xbfinstruction\toutput\n"
        b'q1\t"Yes," she said.\n'  # line 2: text after a closing quote
        b"q2\ta2\n"
        b'q3\t"line one\n\xef\xbb\xbfline two"\n'  # lines 4-5: a BOM character inside a value
        b"\t\n"  # line 6: blank values
        b"\n"  # line 7: no row
        b'q8\t"To be or not\n'  # lines 8-10: never closed
        b"q9\ta9\n"
        b"q10\ta10\n"
    )
    stats = EncodeStats()
    spec = EncodeSpec(256, "chatml", FieldMapping(), on_bad_row="skip")
    samples = list(iter_encoded([str(tsv)], smollm2_tokenizer, spec, stats))
    assert [s.row.index for s in samples] == [3, 4]
    assert supervised_text(smollm2_tokenizer, samples[1].input_ids, samples[1].labels) == (
        "line one\n\ufeffline two<|im_end|>"
    )
    rejects = {r["row"]: r for r in stats.rejects}
    assert sorted(rejects) == [2, 6, 8] and stats.rows == 5
    assert rejects[2]["reason"].startswith(f"{tsv}, line 2: not valid TSV (")
    assert rejects[2]["data"]["raw"] == 'q1\t"Yes," she said.\n'
    assert "field 'instruction' (prompt_key) is empty" in rejects[6]["reason"]
    assert "(lines 8-10: a quote opened on line 8 takes in every line after it)" in rejects[8]["reason"]
    assert rejects[8]["data"]["raw"] == 'q8\t"To be or not\nq9\ta9\nq10\ta10\n'


def test_a_key_given_twice_in_one_object_is_a_bad_row(tmp_path, smollm2_tokenizer):
    """json keeps the last of two values of one key and drops the other silently."""
    twice_top = '{"instruction": "q", "output": "FIRST", "output": "SECOND"}'
    twice_turn = (
        '{"messages": [{"role": "user", "content": "q"}, '
        '{"role": "assistant", "content": "A", "content": "B"}]}'
    )
    lines = tmp_path / "twice.jsonl"
    lines.write_text(f"{twice_top}\n{json.dumps(ROWS[0])}\n{twice_turn}\n")
    listed = tmp_path / "twice.json"
    listed.write_text(f"[{json.dumps(ROWS[0])}, {twice_turn}, {twice_top}]")
    for f, unit, expected in (
        (lines, "line", [(1, "output"), (3, "messages[1].content")]),
        (listed, "row", [(2, "messages[1].content"), (3, "output")]),
    ):
        _, stats = encode_files([str(f)], smollm2_tokenizer, spec(on_bad_row="skip"))
        assert stats.samples == 1
        assert [(r["row"], r["reason"]) for r in stats.rejects] == [
            (n, f"{f}, {unit} {n}: field '{field}' is given twice in one object; JSON readers keep one of the "
             "values and drop the other silently, so which one is meant cannot be told.")
            for n, field in expected
        ]  # fmt: skip


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_file_in_utf16_or_utf32_is_named_for_its_encoding(tmp_path, codec, suffix):
    """PowerShell's `>` writes UTF-16 with a BOM: every line would read as broken JSON."""
    from sft_core.data.sources import read_rows

    text = "instruction,output\nq,a\n" if suffix == ".csv" else '{"instruction": "q", "output": "a"}\n'
    f = tmp_path / f"d{suffix}"
    bom = {"utf-16": "", "utf-16-be": "\ufeff", "utf-32": ""}[codec]  # the -be codec writes no BOM itself
    f.write_bytes((bom + text).encode(codec))
    wide = "UTF-32" if codec == "utf-32" else "UTF-16"
    with pytest.raises(DataError, match=rf"d{suffix}: is {wide}-encoded .*save it as UTF-8"):
        list(read_rows(str(f)))


def test_a_json_object_wrapping_the_rows_is_a_bad_row_saying_where_they_are(tmp_path, smollm2_tokenizer):
    from sft_core.data.sources import read_rows

    tok = smollm2_tokenizer
    f = tmp_path / "wrapped.json"
    f.write_text(json.dumps({"version": 2, "data": [{"instruction": "q", "output": "a"}] * 3}))
    _, stats = encode_files([str(f)], tok, spec(on_bad_row="skip"))
    assert stats.rejected == 1
    assert re.search(
        r"wrapped.json, row 1: field 'instruction' \(prompt_key\) is missing.*Its field 'data' holds a list "
        r"of 3 objects: if those are the rows, give that list itself",
        stats.rejects[0]["reason"],
    )
    # A single object is one row, also one with a list of objects among its fields.
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"instruction": "q", "output": "a", "annotations": [{"rater": 1}]}))
    assert [r.index for r in read_rows(str(one))] == [1]
    assert encode_files([str(one)], tok, spec())[1].samples == 1
