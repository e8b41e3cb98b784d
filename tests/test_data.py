"""The data path with the real SmolLM2 tokenizer: answer-only labels, errors, length policy, packing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_core.data import IGNORE_INDEX
from sft_core.data.encode import encode_files
from sft_core.data.labels import encode_messages
from sft_core.data.messages import FieldMapping
from sft_core.data.packing import build_row, pack_best_fit_decreasing, plan_rows
from sft_core.data.spec import EncodeSpec
from sft_core.data.templates import get_template
from sft_core.errors import DataError

FIELDS = FieldMapping(prompt_key="instruction", response_key="output", query_key="input", system_key="system")


def spec(sequence_length: int = 256, template: str = "native", **kw) -> EncodeSpec:
    return EncodeSpec(sequence_length, template, FIELDS, **kw)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def supervised_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_labels_supervise_only_the_answer_and_its_end_of_turn_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    template = get_template("native", tok)
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ids, labels = encode_messages(tok, template, messages, "test")
    assert supervised_text(tok, ids, labels) == "Paris.<|im_end|>"
    text = tok.decode(ids)
    assert "You are a helpful AI assistant named SmolLM" in text  # the injected default system prompt...
    assert "SmolLM" not in supervised_text(tok, ids, labels)  # ...is never trained on
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]  # no double BOS


def test_multi_turn_supervises_every_assistant_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ids, labels = encode_messages(tok, get_template("chatml", tok), messages, "test")
    assert supervised_text(tok, ids, labels) == "4<|im_end|>6<|im_end|>"


def test_end_of_turn_is_supervised_although_pad_equals_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids, labels = encode_messages(
        tok,
        get_template("native", tok),
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "t",
    )
    assert labels[ids.index(tok.eos_token_id, len(ids) - 3)] == tok.eos_token_id


def test_field_mapping_joins_prompt_and_query_and_uses_system(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    f = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "Sum:", "input": "2 3", "output": "5", "system": "Math."}]
    )
    data, stats = encode_files([f], tok, spec(256, "native"))
    ids, labels = data.sample(0)
    text = tok.decode(ids)
    assert "<|im_start|>system\nMath.<|im_end|>" in text and "SmolLM" not in text
    assert "<|im_start|>user\nSum:\n2 3<|im_end|>" in text
    assert supervised_text(tok, ids, labels) == "5<|im_end|>"
    assert stats.samples == 1 and stats.supervised_tokens == int((labels[1:] != IGNORE_INDEX).sum())


@pytest.mark.parametrize(
    ("row", "field", "state"),
    [
        ({"output": "x"}, "instruction", "is missing"),
        ({"instruction": "q", "output": "  "}, "output", "is empty"),
    ],
)
def test_row_without_a_required_field_names_file_row_and_field(
    tmp_path, smollm2_tokenizer, row, field, state
):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, row])
    with pytest.raises(DataError) as err:
        encode_files([f], smollm2_tokenizer, spec(256, "native"))
    assert f"{f}, row 2: field '{field}'" in str(err.value) and state in str(err.value)


def test_unreadable_json_line_names_file_and_line(tmp_path, smollm2_tokenizer):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=rf"{f}, line 2: not valid JSON"):
        encode_files([str(f)], smollm2_tokenizer, spec(256, "native"))


def test_json_list_files_are_read_like_jsonl(tmp_path, smollm2_tokenizer):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    data, _ = encode_files([str(tmp_path / "d.json")], smollm2_tokenizer, spec(256, "chatml"))
    assert len(data) == 3


def test_length_policy_truncates_drops_or_stops_and_counts(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    long_answer = " ".join(["word"] * 200)
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "short", "output": "ok"},
            {"instruction": "long", "output": long_answer},
            {"instruction": " ".join(["prompt"] * 200), "output": "unseen"},
        ],
    )
    data, stats = encode_files([f], tok, spec(64, "chatml", length_policy="truncate"))
    # Row 2 is cut (answer partly kept); row 3 loses its whole answer: dropped, never trained on.
    assert (stats.truncated, stats.dropped, len(data)) == (1, 1, 2)
    assert [(e["row"], e["action"]) for e in stats.report] == [(2, "truncated"), (3, "dropped")]
    assert max(data.lengths()) == 64
    _, stats = encode_files([f], tok, spec(64, "chatml", length_policy="drop"))
    assert (stats.truncated, stats.dropped) == (0, 2)
    with pytest.raises(DataError, match=r"row 2: the sample has \d+ tokens, more than sequence_length=64"):
        encode_files([f], tok, spec(64, "chatml", length_policy="error"))


def test_best_fit_decreasing_is_deterministic_and_respects_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=500)
    bins = pack_best_fit_decreasing(lengths, 128)
    assert bins == pack_best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))  # every sample exactly once
    assert all(lengths[b].sum() <= 128 for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 128 * 1.05)) + 1  # close to the lower bound


def test_packed_samples_do_not_attend_to_each_other(tmp_path, smollm2_tokenizer, tiny_model_dir):
    """Logits of each sample inside a packed row equal its logits run alone."""
    from sft_core.model.load import load_causal_lm

    tok = smollm2_tokenizer
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": f"question {i}", "output": "answer " * (i + 1)} for i in range(4)],
    )
    data, _ = encode_files([f], tok, spec(512, "native"))
    plan = plan_rows(data, 512, packing=True)
    assert len(plan.rows) == 1 and len(plan.rows[0]) == 4
    ids, labels, positions = build_row(data, plan.rows[0])
    assert (positions == 0).sum() == 4
    assert all(labels[data.offsets[s] - data.offsets[0]] == IGNORE_INDEX for s in [0])
    model = load_causal_lm(tiny_model_dir, torch.float32).eval()
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor(ids)[None].long(), position_ids=torch.tensor(positions)[None]
        ).logits[0]
        start = 0
        for s in plan.rows[0]:
            x, _ = data.sample(s)
            alone = model(input_ids=torch.tensor(x)[None].long()).logits[0]
            torch.testing.assert_close(packed[start : start + len(x)], alone, rtol=1e-4, atol=1e-4)
            start += len(x)


def test_on_bad_row_skip_counts_and_lists_every_rejected_row(tmp_path, smollm2_tokenizer):
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        '{"instruction": "a", "output": "b"}\n'
        '{"instruction": "no answer"}\n'
        '{"instruction": "broken", "output": \n'
        '{"instruction": "c", "output": "d"}\n'
    )
    tok = smollm2_tokenizer
    data, stats = encode_files([str(f)], tok, spec(256, "chatml", on_bad_row="skip"))
    assert len(data) == 2 and stats.rejected == 2
    assert [(r["row"], r["file"]) for r in stats.rejects] == [(2, str(f)), (3, str(f))]
    assert "field 'output'" in stats.rejects[0]["reason"] and "not valid JSON" in stats.rejects[1]["reason"]
    assert stats.rejects[0]["data"] == {"instruction": "no answer"}


def test_sharegpt_parquet_and_saved_dataset_sources(tmp_path, smollm2_tokenizer):
    import datasets

    tok = smollm2_tokenizer
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {
            "conversations": [
                {"from": "system", "value": "Terse."},
                {"from": "human", "value": "2+2"},
                {"from": "gpt", "value": "4"},
            ]
        },
    ]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved"):
        data, _ = encode_files([str(source)], tok, spec(256, "chatml"))
        texts = [supervised_text(tok, *data.sample(i)) for i in range(len(data))]
        assert texts == ["Hello!<|im_end|>", "4<|im_end|>"], source


def test_sharegpt_unknown_speaker_names_the_field(tmp_path, smollm2_tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "robot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"row 1: field 'conversations\[1\].from' is 'robot'"):
        encode_files([f], smollm2_tokenizer, spec(256, "chatml"))


def test_last_assistant_turn_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    messages = [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "first"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"},
    ]  # fmt: skip
    ids, labels = encode_messages(tok, get_template("chatml", tok), messages, "t", "last_assistant_turn")
    assert supervised_text(tok, ids, labels) == "second<|im_end|>"


def test_worker_processes_encode_exactly_like_one_process(tmp_path, smollm2_tokenizer):
    from tests.helpers import DEMO

    tok = smollm2_tokenizer
    args = ([str(DEMO / "train.jsonl")], tok, spec(128, "native"))
    one, stats1 = encode_files(*args, workers=1)
    two, stats2 = encode_files(*args, workers=2)
    assert np.array_equal(one.input_ids, two.input_ids) and np.array_equal(one.labels, two.labels)
    assert np.array_equal(one.offsets, two.offsets) and stats1.report == stats2.report


def test_truncate_can_keep_the_end_token_supervised(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    f = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "long", "output": " ".join(["word"] * 200)}])
    data, stats = encode_files([f], tok, spec(64, "chatml", truncate_keep_end_token=True))
    ids, labels = data.sample(0)
    assert stats.truncated == 1 and len(ids) == 64
    assert ids[-1] == labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    plain, _ = encode_files([f], tok, spec(64, "chatml"))
    assert plain.sample(0)[0][-1] != tok.convert_tokens_to_ids("<|im_end|>")


def test_a_tokenizer_without_pad_or_with_a_wrong_eos_is_fixed(smollm2_tokenizer):
    import copy

    from transformers import LlamaConfig

    from sft_core.model.resolve import fix_tokenizer

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.pad_token = None
    tok.eos_token = "<|im_start|>"  # what a GGUF's metadata may say
    changes = fix_tokenizer(tok, LlamaConfig(eos_token_id=2, pad_token_id=None))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert len(changes) == 2


def test_hub_dataset_ids_say_clearly_that_the_hub_is_off(smollm2_tokenizer):
    with pytest.raises(DataError, match=r"'hf://org/data' is a hub dataset, but the hub is switched off"):
        encode_files(["hf://org/data"], smollm2_tokenizer, spec(64, "chatml"))


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}], r"messages\[2\]\.role' is 'bot'"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}],
         "ends with a user turn"),
    ],
)  # fmt: skip
def test_an_unknown_role_or_an_unanswered_last_question_is_a_bad_row_naming_file_and_row(
    tmp_path, messages, expected
):
    from sft_core.data.messages import row_to_messages
    from sft_core.data.sources import Row

    row = Row(file=f"{tmp_path}/d.jsonl", index=7, data={"messages": messages})
    with pytest.raises(DataError, match=expected) as err:
        row_to_messages(row, FieldMapping(format="messages"))
    assert "d.jsonl" in str(err.value) and "7" in str(err.value)


def test_the_prepared_tokenizer_is_reused_until_its_source_changes(tmp_path, tiny_model_dir, monkeypatch):
    """A rerun reads the record of the tokenizer prepared before instead of loading it again; a
    changed tokenizer file or a deleted prepared folder prepares it again."""
    import shutil

    from prefect.logging import disable_run_logger

    import tasks.model

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.setenv("SFT_HOME", str(tmp_path / "home"))
    loads = []
    real = tasks.model.load_tokenizer
    monkeypatch.setattr(tasks.model, "load_tokenizer", lambda d: loads.append(d) or real(d))
    with disable_run_logger():
        first = tasks.model.prepare_tokenizer.fn(str(model))
        assert tasks.model.prepare_tokenizer.fn(str(model)) == first and len(loads) == 1
        config = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
        changed = tasks.model.prepare_tokenizer.fn(str(model))
        assert len(loads) == 2 and changed.fingerprint != first.fingerprint
        shutil.rmtree(changed.tokenizer_dir)
        assert tasks.model.prepare_tokenizer.fn(str(model)) == changed and len(loads) == 3
    assert Path(changed.tokenizer_dir, "tokenizer.json").is_file()


def test_validation_samples_found_in_training_are_counted_by_their_exact_tokens():
    from sft_core.data.store import EncodedData

    def data(*samples: list[int]) -> EncodedData:
        arrays = [np.array(s, dtype=np.int32) for s in samples]
        return EncodedData.from_samples(arrays, [a.copy() for a in arrays])

    train = data([1, 2, 3], [4, 5], [6, 7, 8, 9])
    # The same tokens twice (counted twice), a prefix, a longer one, one with a token changed.
    validation = data([4, 5], [1, 2], [1, 2, 3, 0], [6, 7, 8, 9], [4, 5], [6, 7, 8, 10])
    assert validation.count_in(train.sample_digests()) == 3
    assert data().count_in(train.sample_digests()) == 0


def test_an_eos_among_the_models_stop_ids_is_kept(smollm2_tokenizer):
    """A generation config listing several stop ids (Llama-3-Instruct: end of text, end of turn):
    the tokenizer's eos, when it is one of them, is the model's own and stays."""
    import copy

    from transformers import GenerationConfig, LlamaConfig

    from sft_core.model.resolve import fix_tokenizer

    tok = copy.deepcopy(smollm2_tokenizer)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fix_tokenizer(tok, LlamaConfig(), GenerationConfig(eos_token_id=[0, im_end])) == []
    assert tok.eos_token == "<|im_end|>"
    tok.eos_token = "<|im_start|>"  # not among them: the first is taken
    fix_tokenizer(tok, LlamaConfig(), GenerationConfig(eos_token_id=[0, im_end]))
    assert tok.eos_token_id == 0


def test_an_exported_model_stops_at_the_end_of_turn_it_was_trained_to_end_answers_with(
    tmp_path, tiny_model_dir
):
    """A base model's generation config names only its end-of-text token; trained with a chat
    template that ends turns with another, the export must stop there too."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from sft_core.model.stop_tokens import stop_at

    folder = tmp_path / "base"
    shutil.copytree(tiny_model_dir, folder)
    GenerationConfig(eos_token_id=0, bos_token_id=1).save_pretrained(folder)  # a base model's
    assert stop_at(folder, 2) and not stop_at(folder, 2)  # once
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [0, 2]
    model = AutoModelForCausalLM.from_pretrained(folder)

    def always_end_of_turn(input_ids, scores):
        scores[:, :] = -float("inf")
        scores[:, 2] = 0.0
        return scores

    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=False,
                         logits_processor=[always_end_of_turn])  # fmt: skip
    assert out[0, 3:].tolist() == [2]  # one end of turn, then it stopped
    (folder / "generation_config.json").unlink()
    assert stop_at(folder, 7)  # made from config.json where missing (its eos: 2)
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [2, 7]
    assert not stop_at(tmp_path, 2)  # no config.json: an adapter folder, left alone


def test_two_writers_of_one_cache_entry_never_share_a_temporary_file(tmp_path):
    """Two runs encoding the same data at once write the same entry: each writes a file of its own
    and renames it into place, so both succeed and the entry is whole (a shared temporary name made
    one writer's rename fail, or move the other's half-written file into place)."""
    import threading

    from sft_core.data.store import EncodedData, stored_digest

    path = tmp_path / "encoded.npz"
    data = EncodedData(np.arange(50_000, dtype=np.int32), np.arange(50_000, dtype=np.int32),
                       np.array([0, 25_000, 50_000]))  # fmt: skip
    errors: list[BaseException] = []
    for _ in range(10):
        start = threading.Barrier(2)

        def write(start: threading.Barrier = start) -> None:
            start.wait()
            try:
                data.save(path)
            except BaseException as err:
                errors.append(err)

        writers = [threading.Thread(target=write) for _ in range(2)]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
    assert not errors
    assert EncodedData.load(path).digest() == data.digest() == stored_digest(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoded.digest", "encoded.npz"]
