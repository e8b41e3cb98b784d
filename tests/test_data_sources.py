"""Data files as they arrive: gzip-compressed, a saved DatasetDict, files joined with `cat`, rows
nested absurdly deep. Each reads like its plain form, or is a bad row / an error naming file and row."""

from __future__ import annotations

import gzip
import json

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
