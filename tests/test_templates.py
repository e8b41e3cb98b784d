"""Templates and answer spans: golden cases with the real SmolLM2 tokenizer, a property test over
random conversations, and agreement with transformers' own assistant mask where a template has
{% generation %} markers."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_core.data import IGNORE_INDEX
from sft_core.data.labels import encode_messages
from sft_core.data.templates import ChatTemplate, get_template, supervised_char_spans
from sft_core.errors import ConfigError, DataError


def supervised(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])


CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


@pytest.mark.parametrize(
    ("template", "rendered", "answer"),
    [
        ("native", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                   "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n", "Blue.<|im_end|>"),
        ("chatml", "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n", "Blue.<|im_end|>"),
        ("qwen2_5", "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n", "Blue.<|im_end|>"),
        ("qwen3", "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nBlue.<|im_end|>\n",
         "Blue.<|im_end|>"),  # the empty think block is not supervised
    ],
)  # fmt: skip
def test_golden_rendering_and_answer_span(smollm2_tokenizer, template, rendered, answer):
    tok = smollm2_tokenizer
    ids, labels = encode_messages(tok, get_template(template, tok), CHAT, "golden")
    assert tok.decode(ids) == rendered
    assert supervised(tok, ids, labels) == answer


def test_llama3_template_supervises_answer_and_eot(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    ids, labels = encode_messages(
        tok,
        get_template("llama3", tok),
        [{"role": "user", "content": " Hi "}, {"role": "assistant", "content": " Yo. "}],
        "t",
    )
    assert tok.decode(ids).count("<|im_start|>") == 1  # bos_token once, no double BOS
    assert supervised(tok, ids, labels) == "Yo.<|eot_id|>"


def test_custom_jinja_file(tmp_path, smollm2_tokenizer):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant: {% endif %}")  # fmt: skip
    tok = smollm2_tokenizer
    template = get_template(str(path), tok)
    ids, labels = encode_messages(tok, template, CHAT, "t")
    # The generation prompt ends in a space. Tokenized whole, BPE would glue it to the answer's first
    # word; at inference it is the prompt's last token, so training keeps it there too.
    prompt = tok(template.render(tok, CHAT[:1], True), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt
    assert supervised(tok, ids, labels) == "Blue.<|im_end|>"
    with pytest.raises(ConfigError, match="does not exist"):
        get_template(str(tmp_path / "missing.jinja"), tok)


GENERATION_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TEXT = (
    st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "P", "Zs"]), min_size=1, max_size=40)
    .map(str.strip)
    .filter(bool)
)
CONVERSATIONS = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3).map(
    lambda turns: [
        m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=CONVERSATIONS, system=st.booleans())
def test_supervised_tokens_are_exactly_the_answers_and_their_end_tokens(smollm2_tokenizer, messages, system):
    tok = smollm2_tokenizer
    if system:
        messages = [{"role": "system", "content": "Be kind."}, *messages]
    for name in ("native", "chatml"):
        ids, labels = encode_messages(tok, get_template(name, tok), messages, "property")
        expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert supervised(tok, ids, labels) == expected
    # Where the template marks generation, transformers computes the mask itself: they must agree.
    ids, labels = encode_messages(tok, ChatTemplate("generation", GENERATION_CHATML), messages, "property")
    reference = tok.apply_chat_template(
        messages,
        chat_template=GENERATION_CHATML,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert reference["input_ids"] == ids
    assert reference["assistant_masks"] == [int(lab != IGNORE_INDEX) for lab in labels]


@pytest.mark.parametrize("name", ["native", "chatml", "qwen2_5", "qwen3"])
def test_fast_render_equals_apply_chat_template(smollm2_tokenizer, name):
    tok = smollm2_tokenizer
    template = get_template(name, tok)
    messages = [{"role": "system", "content": "S"}, *CHAT, {"role": "user", "content": "More?"}]
    for gen in (False, True):
        assert template.render(tok, messages, gen) == tok.apply_chat_template(
            messages, chat_template=template.source, tokenize=False, add_generation_prompt=gen
        )


def test_empty_think_block_is_supervised_only_when_asked(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, labels = encode_messages(tok, get_template("qwen3", tok, supervise_empty_think=True), CHAT, "t")
    assert supervised(tok, ids, labels) == "<think>\n\n</think>\n\nBlue.<|im_end|>"


@pytest.mark.parametrize("name", ["qwen3", "chatml"])
def test_an_empty_think_block_written_in_the_answer_is_left_out_as_an_inserted_one(smollm2_tokenizer, name):
    """Non-thinking Qwen3 data often writes the empty block into the answer itself: it renders the
    same text as the block the template inserts, so it gets the same labels."""
    tok = smollm2_tokenizer
    written = [CHAT[0], {"role": "assistant", "content": "<think>\n\n</think>\n\nBlue."}]
    ids, labels = encode_messages(tok, get_template(name, tok), written, "t")
    assert supervised(tok, ids, labels) == "Blue.<|im_end|>"
    if name == "qwen3":
        assert (ids, labels) == encode_messages(tok, get_template(name, tok), CHAT, "t")
    ids, labels = encode_messages(tok, get_template(name, tok, supervise_empty_think=True), written, "t")
    assert supervised(tok, ids, labels) == "<think>\n\n</think>\n\nBlue.<|im_end|>"


def test_qwen3_keeps_an_answers_own_think_block_single(smollm2_tokenizer):
    tok = smollm2_tokenizer
    reasoning = [CHAT[0], {"role": "assistant", "content": "<think>\nBlue is calm.\n</think>\n\nBlue."}]
    ids, labels = encode_messages(tok, get_template("qwen3", tok), reasoning, "t")
    rendered = tok.decode(ids)
    assert rendered.count("<think>") == 1
    assert rendered.endswith("<|im_start|>assistant\n<think>\nBlue is calm.\n</think>\n\nBlue.<|im_end|>\n")
    # The reasoning is the answer's own text: trained on, all of it.
    assert supervised(tok, ids, labels) == "<think>\nBlue is calm.\n</think>\n\nBlue.<|im_end|>"


# Written here after the behaviour of Qwen3's own template: an answer after the last question shows
# its reasoning in a think block (an empty one without); earlier answers show only their final text.
HISTORY_WITHOUT_REASONING = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}"
    "{% set parts = m.content.split('</think>') %}"
    "{% set answer = parts[-1].lstrip('\n') %}"
    "{% set thought = parts[0].split('<think>')[-1].strip('\n') if parts | length > 1 else '' %}"
    "{% if loop.index0 > ns.last_user %}"
    "{{ '<|im_start|>assistant\n<think>\n' + thought + '\n</think>\n\n' + answer + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>assistant\n' + answer + '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("first", "second", "trained"),
    [
        ("Red.", "Blue.", "Blue.<|im_end|>"),  # no reasoning: the empty think block is not trained
        ("<think>\nWarm.\n</think>\n\nRed.", "<think>\nCalm.\n</think>\n\nBlue.",
         "<think>\nCalm.\n</think>\n\nBlue.<|im_end|>"),
    ],
)  # fmt: skip
def test_a_template_that_drops_reasoning_from_history_trains_the_last_turn_as_at_inference(
    tmp_path, smollm2_tokenizer, first, second, trained
):
    tok = smollm2_tokenizer
    path = tmp_path / "history_without_reasoning.jinja"
    path.write_text(HISTORY_WITHOUT_REASONING)
    template = get_template(str(path), tok)
    chat = [
        {"role": "user", "content": "A warm colour?"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "A calm one?"}, {"role": "assistant", "content": second},
    ]  # fmt: skip
    # Every turn in one sample would train the first answer in a context inference never shows.
    with pytest.raises(
        DataError, match=r"renders turn 2 differently.*supervise=each_assistant_turn_as_sample"
    ):
        encode_messages(tok, template, chat, "t", "all_assistant_turns")
    ids, labels = encode_messages(tok, template, chat, "t", "last_assistant_turn")
    assert supervised(tok, ids, labels) == trained
    # The context is what the model is given at inference: the history without its reasoning, then
    # the generation prompt, tokenized alone.
    prompt = tok(template.render(tok, chat[:3], add_generation_prompt=True), add_special_tokens=False)
    assert ids[: len(prompt["input_ids"])] == prompt["input_ids"]
    assert "Warm." not in tok.decode(ids) and "<|im_start|>assistant\nRed.<|im_end|>" in tok.decode(ids)


def test_each_answer_as_a_sample_of_its_own_trains_every_turn_in_its_inference_context(
    tmp_path, smollm2_tokenizer
):
    """A template that drops old reasoning refuses every turn in one sample; with
    each_assistant_turn_as_sample a row of three answers gives three samples, each the conversation
    up to one answer, rendered and tokenized exactly as inference gives it, that answer alone trained
    (its own reasoning included)."""
    import json

    from sft_core.data.encode import encode_files
    from sft_core.data.spec import EncodeSpec

    tok = smollm2_tokenizer
    path = tmp_path / "history_without_reasoning.jinja"
    path.write_text(HISTORY_WITHOUT_REASONING)
    template = get_template(str(path), tok)
    chat = [
        {"role": "user", "content": "A warm colour?"}, {"role": "assistant", "content": "<think>\nWarm.\n</think>\n\nRed."},
        {"role": "user", "content": "A calm one?"}, {"role": "assistant", "content": "<think>\nCalm.\n</think>\n\nBlue."},
        {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green."},
    ]  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"messages": chat[:2]}) + "\n")
    spec = EncodeSpec(512, str(path), supervise="each_assistant_turn_as_sample")
    encoded, stats = encode_files([str(data)], tok, spec)
    assert (stats.rows, stats.samples, stats.rejected, stats.dropped) == (2, 4, 0, 0)
    trained = [
        "<think>\nWarm.\n</think>\n\nRed.<|im_end|>",
        "<think>\nCalm.\n</think>\n\nBlue.<|im_end|>",
        "Green.<|im_end|>",  # the empty think block the template writes is not trained
        "<think>\nWarm.\n</think>\n\nRed.<|im_end|>",
    ]
    ends = [2, 4, 6, 2]
    for k, (answer, end) in enumerate(zip(trained, ends, strict=True)):
        ids, labels = (a.tolist() for a in encoded.sample(k))
        assert supervised(tok, ids, labels) == answer
        # Exactly the last-turn encoding of the conversation cut after that answer ...
        assert (ids, labels) == encode_messages(tok, template, chat[:end], "t", "last_assistant_turn")
        # ... whose context is what inference gives the model: history without its reasoning.
        prompt = tok(
            template.render(tok, chat[: end - 1], add_generation_prompt=True), add_special_tokens=False
        )
        assert ids[: len(prompt["input_ids"])] == prompt["input_ids"]
        assert all(lab == IGNORE_INDEX for lab in labels[: len(prompt["input_ids"])])
    assert stats.supervised_tokens == sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in trained)


def test_a_weight_0_answer_is_context_in_every_supervise_mode(tmp_path, smollm2_tokenizer):
    """OpenAI's per-turn `weight`: 0 keeps an answer in the conversation, untrained. The tokens are
    those of the unweighted conversation; the labels lose that answer alone; with one sample per
    answer it gives no sample, and the others keep their numbers among the row's answers."""
    import json

    from sft_core.data.encode import EncodeStats, iter_encoded
    from sft_core.data.spec import EncodeSpec

    tok = smollm2_tokenizer
    template = get_template("chatml", tok)
    chat = [
        {"role": "user", "content": "A warm colour?"}, {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "A calm one?"}, {"role": "assistant", "content": "Blue, I think."},
        {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green."},
    ]  # fmt: skip
    weighted = [dict(m, weight=0) if m["content"] == "Blue, I think." else m for m in chat]
    data = tmp_path / "weighted.jsonl"
    data.write_text(json.dumps({"messages": weighted}) + "\n")
    plain_ids, plain_labels = encode_messages(tok, template, chat, "t")

    def encode(supervise: str) -> list:
        stats = EncodeStats()
        samples = list(iter_encoded([str(data)], tok, EncodeSpec(512, "chatml", supervise=supervise), stats))
        assert stats.rejected == 0
        return samples

    (whole,) = encode("all_assistant_turns")
    assert whole.input_ids.tolist() == plain_ids
    assert (
        supervised(tok, whole.input_ids.tolist(), whole.labels.tolist()) == "Red.<|im_end|>Green.<|im_end|>"
    )
    kept = {i for i, lab in enumerate(whole.labels.tolist()) if lab != IGNORE_INDEX}
    lost = [i for i, lab in enumerate(plain_labels) if lab != IGNORE_INDEX and i not in kept]
    assert tok.decode([plain_ids[i] for i in lost]) == "Blue, I think.<|im_end|>"  # that answer alone

    each = encode("each_assistant_turn_as_sample")
    assert [s.turn for s in each] == [1, 3]
    assert each[1].where.endswith("row 1, assistant turn 3")
    assert (each[1].input_ids.tolist(), each[1].labels.tolist()) == encode_messages(
        tok, template, chat, "t", "last_assistant_turn"
    )
    (last,) = encode("last_assistant_turn")
    assert supervised(tok, last.input_ids.tolist(), last.labels.tolist()) == "Green.<|im_end|>"
    # The last answer at weight 0 under last_assistant_turn: nothing to train, a bad row.
    data.write_text(json.dumps({"messages": [*chat[:5], dict(chat[5], weight=0)]}) + "\n")
    stats = EncodeStats()
    spec = EncodeSpec(512, "chatml", supervise="last_assistant_turn", on_bad_row="skip")
    assert list(iter_encoded([str(data)], tok, spec, stats)) == []
    assert "its last assistant turn has weight 0" in stats.rejects[0]["reason"]


def test_each_answer_as_a_sample_counts_the_length_policy_per_sample_and_rejects_a_row_whole(
    tmp_path, smollm2_tokenizer
):
    import json

    from sft_core.data.encode import encode_files
    from sft_core.data.spec import EncodeSpec

    tok = smollm2_tokenizer
    long = "word " * 40
    chat = [
        {"role": "user", "content": "Short?"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Long?"}, {"role": "assistant", "content": long},
    ]  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"messages": chat}) + "\n")
    first_len = len(
        encode_messages(tok, get_template("chatml", tok), chat[:2], "t", "last_assistant_turn")[0]
    )
    each = {"template": "chatml", "supervise": "each_assistant_turn_as_sample"}
    # The second answer's sample is too long: dropped and reported with its turn; the first kept.
    encoded, stats = encode_files([str(data)], tok, EncodeSpec(first_len + 5, length_policy="drop", **each))
    assert (stats.rows, stats.samples, stats.dropped, len(encoded)) == (1, 1, 1, 1)
    assert stats.report == [
        {"file": str(data), "row": 1, "turn": 2, "tokens": stats.report[0]["tokens"],
         "sequence_length": first_len + 5, "action": "dropped"},
    ]  # fmt: skip
    # A cut that leaves the second answer only its end token makes the row bad: none of its
    # samples is trained (a row is rejected whole), and the reason names the turn.
    chatml = get_template("chatml", tok)
    prompt = len(
        tok(chatml.render(tok, chat[:3], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    )
    spec = EncodeSpec(prompt + 1, truncate_keep_end_token=True, on_bad_row="skip", **each)
    encoded, stats = encode_files([str(data)], tok, spec)
    assert (stats.rows, stats.samples, stats.rejected, len(encoded)) == (1, 0, 1, 0)
    assert "row 1, assistant turn 2: cut to sequence_length" in stats.rejects[0]["reason"]
    # One more token: the second answer keeps a token and its end token; both samples are trained.
    encoded, stats = encode_files([str(data)], tok, replace(spec, sequence_length=prompt + 2))
    assert (stats.samples, stats.truncated, stats.rejected) == (2, 1, 0)
    ids, labels = (a.tolist() for a in encoded.sample(1))
    assert supervised(tok, ids, labels) == "word<|im_end|>"


@pytest.mark.parametrize("name", ["native", "chatml", "qwen2_5"])
def test_a_conversation_may_open_with_the_assistant(smollm2_tokenizer, name):
    # native and qwen2_5 write a default system prompt before the first turn; it is not supervised.
    tok = smollm2_tokenizer
    greeting = [{"role": "assistant", "content": "Hi! Ask me anything."}, *CHAT]
    ids, labels = encode_messages(tok, get_template(name, tok), greeting, "t")
    assert supervised(tok, ids, labels) == "Hi! Ask me anything.<|im_end|>Blue.<|im_end|>"


def assert_tokenized_as_at_inference(tok, template, messages, ids, labels):
    """Nothing of the text is lost or changed; each supervised run of tokens is exactly one span's
    text; the first answer follows exactly the tokens its prompt has alone, as at inference; no
    token crosses a span's start."""
    text, spans = supervised_char_spans(template, tok, messages, "t")
    assert tok.decode(ids) == text
    keep = [lab != IGNORE_INDEX for lab in labels]
    runs = [k for k in range(len(ids)) if keep[k] and (k == 0 or not keep[k - 1])]
    ends = [k for k in range(1, len(ids) + 1) if keep[k - 1] and (k == len(ids) or not keep[k])]
    assert len(runs) == len(spans)
    for (s0, s1), k0, k1 in zip(spans, runs, ends, strict=True):
        assert tok.decode(ids[:k0]) == text[:s0]
        assert tok.decode(ids[k0:k1]) == text[s0:s1]
    assert ids[: runs[0]] == tok(text[: spans[0][0]], add_special_tokens=False)["input_ids"]


# Real answers: leading/trailing whitespace and newlines, unicode, literal special-token text.
UGLY = st.lists(
    st.sampled_from(
        ["\n", " ", "\t", "\n\n", "  \n", "é", "日本", "🙂", "<|im_end|>", "<|im_start|>", "ok", "A b."]
    ),
    min_size=1,
    max_size=6,
).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answers=st.lists(UGLY, min_size=1, max_size=3), question=UGLY)
def test_end_of_turn_is_supervised_whatever_the_answer_ends_with(smollm2_tokenizer, answers, question):
    tok = smollm2_tokenizer
    messages = [
        m
        for a in answers
        for m in ({"role": "user", "content": question}, {"role": "assistant", "content": a})
    ]
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    for name in ("native", "chatml"):
        template = get_template(name, tok)
        ids, labels = encode_messages(tok, template, messages, "property")
        # ChatML renders content as given: exactly the answers and their end tokens are supervised.
        assert supervised(tok, ids, labels) == "".join(a + "<|im_end|>" for a in answers)
        assert_tokenized_as_at_inference(tok, template, messages, ids, labels)
        supervised_ends = sum(1 for i, lab in zip(ids, labels, strict=True) if lab == end_id and i == end_id)
        assert supervised_ends >= len(answers)
        # Each answer as a sample of its own (each_assistant_turn_as_sample): it alone, with its end.
        for k, answer in enumerate(answers, start=1):
            ids_k, labels_k = encode_messages(
                tok, template, messages[: 2 * k], "property", "last_assistant_turn"
            )
            assert supervised(tok, ids_k, labels_k) == answer + "<|im_end|>"
    # transformers' mask tokenizes the text whole, so a leading newline merges with the header's
    # there; wherever the tokens agree, the masks must agree too.
    ids, labels = encode_messages(tok, ChatTemplate("generation", GENERATION_CHATML), messages, "property")
    reference = tok.apply_chat_template(
        messages, chat_template=GENERATION_CHATML, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )  # fmt: skip
    if reference["input_ids"] == ids:
        assert reference["assistant_masks"] == [int(lab != IGNORE_INDEX) for lab in labels]
    else:
        assert any(a[:1].isspace() for a in answers)


@pytest.mark.parametrize(
    ("answer", "tokens"),
    [("\n\nA.", ["Ċ", "Ċ", "A", "."]), ("  \nA.", ["ĠĠ", "Ċ", "A", "."]), (" A.", ["ĠA", "."])],
)
def test_an_answer_opening_with_whitespace_keeps_the_prompts_last_newline_apart(
    smollm2_tokenizer, answer, tokens
):
    """Tokenized whole, "assistant\\n" + "\\n\\nA." gave one supervised "\\n\\n": a token no prompt
    ends before at inference, where the prompt's "\\n" is its own token."""
    tok = smollm2_tokenizer
    for name in ("native", "chatml", "qwen2_5", "qwen3"):
        ids, labels = encode_messages(
            tok, get_template(name, tok), [CHAT[0], {"role": "assistant", "content": answer}], "t"
        )
        answer_ids = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        assert tok.convert_ids_to_tokens(answer_ids) == [*tokens, "<|im_end|>"], name


@pytest.fixture(scope="module")
def llama3_tokenizer(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    return tok


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answers=st.lists(UGLY, min_size=1, max_size=3), question=UGLY)
def test_every_built_in_supervises_its_rendered_answer_and_end_token(
    smollm2_tokenizer, llama3_tokenizer, answers, question
):
    """The span is the content as each template renders it (ChatML variants as given, llama3
    trimmed) plus the end-of-turn token, which is supervised once per answer whatever the content."""
    messages = [
        m
        for a in answers
        for m in ({"role": "user", "content": question}, {"role": "assistant", "content": a})
    ]
    cases = [("qwen2_5", smollm2_tokenizer, "<|im_end|>", False), ("qwen3", smollm2_tokenizer, "<|im_end|>", False),
             ("llama3", llama3_tokenizer, "<|eot_id|>", True)]  # fmt: skip
    for name, tok, end, trims in cases:
        template = get_template(name, tok)
        ids, labels = encode_messages(tok, template, messages, "property")
        expected = "".join((a.strip() if trims else a) + end for a in answers)
        assert supervised(tok, ids, labels) == expected, name
        assert_tokenized_as_at_inference(tok, template, messages, ids, labels)
        end_id = tok.convert_tokens_to_ids(end)
        ends = sum(1 for i, lab in zip(ids, labels, strict=True) if lab == end_id and i == end_id)
        assert ends == len(answers) + sum(a.count(end) for a in answers), name


@pytest.mark.parametrize("name", ["chatml", "qwen2_5", "native"])
def test_a_saved_tokenizer_formats_prompts_with_the_template_it_was_trained_with(
    smollm2_tokenizer, tmp_path, name
):
    from transformers import AutoTokenizer

    from sft_core.data.templates import carry_template

    tok = copy.deepcopy(smollm2_tokenizer)
    template = get_template(name, tok)
    carry_template(name, tok)
    tok.save_pretrained(tmp_path)  # as every checkpoint's Hugging Face folder gets it
    served = AutoTokenizer.from_pretrained(tmp_path)
    for gen in (False, True):
        assert served.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen) == template.render(
            smollm2_tokenizer, CHAT, gen
        )


@pytest.mark.parametrize("supervise_empty_think", [False, True])
def test_a_qwen3_checkpoint_is_prompted_as_its_answers_were_trained(
    smollm2_tokenizer, tmp_path, supervise_empty_think
):
    """Answers without reasoning are trained after an empty think block: a checkpoint whose model
    did not learn to write it (the default) gets it in its generation prompt, as Qwen3's own
    template does with enable_thinking=False; enable_thinking=True prompts for reasoning."""
    from transformers import AutoTokenizer

    from sft_core.data.templates import carry_template

    tok = copy.deepcopy(smollm2_tokenizer)
    template = get_template("qwen3", tok, supervise_empty_think)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]  # fmt: skip
    text, spans = supervised_char_spans(template, tok, chat, "row 1")
    carry_template("qwen3", tok, supervise_empty_think)
    tok.save_pretrained(tmp_path)
    served = AutoTokenizer.from_pretrained(tmp_path)
    prompt = served.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == text[: spans[0][0]]  # exactly up to what the model was trained to write
    assert text[spans[0][0] :].startswith("<think>" if supervise_empty_think else "Hello!")
    thinking = served.apply_chat_template(
        chat[:2], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    plain = served.apply_chat_template(
        chat[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert thinking.endswith("<|im_start|>assistant\n") and plain.endswith("</think>\n\n")
    # The conversation itself renders as in training.
    assert served.apply_chat_template(chat, tokenize=False) == text


def test_a_tokenizer_that_prefixes_every_input_is_tokenized_whole(smollm2_tokenizer):
    """A SentencePiece-style tokenizer puts a prefix space before each input, so pieces tokenized
    apart would not spell the text: such a tokenizer keeps whole-text tokens (and the overlap rule)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sft_core.data.labels import cuts_cleanly

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator(["user assistant Name a colour. Blue sky, 42.\n"] * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"]
    )
    assert cuts_cleanly(smollm2_tokenizer)
    assert not cuts_cleanly(tok)
    template = get_template("chatml", tok)
    chat = [CHAT[0], {"role": "assistant", "content": "Blue sky."}]
    ids, labels = encode_messages(tok, template, chat, "t")
    assert ids == tok(template.render(tok, chat), add_special_tokens=False)["input_ids"]
    assert supervised(tok, ids, labels) == "Blue sky.<|im_end|>"


def test_drop_oldest_turns_fits_a_long_conversation_by_its_history_not_its_answer(
    tmp_path, smollm2_tokenizer
):
    """length_policy: drop_oldest_turns leaves out the oldest exchanges (the system prompt stays)
    until a sample fits: its answer is kept whole, in the context the shorter conversation gives,
    and the cut is reported. Where even the last exchange is too long, the answer is cut as with
    truncate."""
    import json

    from sft_core.data.encode import EncodeStats, iter_encoded
    from sft_core.data.spec import EncodeSpec

    tok = smollm2_tokenizer
    template = get_template("chatml", tok)
    long = " ".join(["history"] * 60)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"First: {long}"}, {"role": "assistant", "content": f"One. {long}"},
        {"role": "user", "content": f"Second: {long}"}, {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "Third?"}, {"role": "assistant", "content": "Three."},
    ]  # fmt: skip
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": chat}) + "\n")
    limit = 100
    assert len(encode_messages(tok, template, chat[:5], "t")[0]) > limit  # turn 2 does not fit whole

    def encode(supervise: str, rows: list | None = None) -> tuple[list, EncodeStats]:
        if rows is not None:
            data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
        stats = EncodeStats()
        spec = EncodeSpec(limit, "chatml", supervise=supervise, length_policy="drop_oldest_turns")
        return list(iter_encoded([str(data)], tok, spec, stats)), stats

    samples, stats = encode("each_assistant_turn_as_sample")
    assert [s.turn for s in samples] == [1, 2, 3]
    # Turn 1 alone is too long: its answer is cut (nothing older to leave out).
    assert len(samples[0].input_ids) == limit
    # Turns 2 and 3: exactly the encoding of the system prompt and the newest exchange(s) that fit.
    for sample, kept in zip(samples[1:], ([chat[0], *chat[3:5]], [chat[0], *chat[3:7]]), strict=True):
        expected = encode_messages(tok, template, kept, "t", "last_assistant_turn")
        assert (sample.input_ids.tolist(), sample.labels.tolist()) == expected
        assert len(sample.input_ids) <= limit
    assert [(r["turn"], r["action"], r.get("turns_dropped")) for r in stats.report] == [
        (1, "truncated", None), (2, "oldest_turns_dropped", 1), (3, "oldest_turns_dropped", 1),
    ]  # fmt: skip
    assert stats.truncated == 3 and stats.dropped == 0
    # All answers in one sample: the oldest exchange goes, the answers after it are trained.
    (whole,), stats = encode("all_assistant_turns")
    assert (
        supervised(tok, whole.input_ids.tolist(), whole.labels.tolist()) == "Two.<|im_end|>Three.<|im_end|>"
    )
    assert stats.report[0]["action"] == "oldest_turns_dropped" and stats.report[0]["turns_dropped"] == 1
    # A conversation that fits is left as it is.
    (short,), stats = encode("all_assistant_turns", [[chat[0], *chat[5:]]])
    assert short.input_ids.tolist() == encode_messages(tok, template, [chat[0], *chat[5:]], "t")[0]
    assert stats.report == [] and stats.truncated == 0


# ChatML whose assistant turns write an empty think block and then the answer without its leading
# newlines, as Qwen3's own template does for a last turn without reasoning.
THINK_LSTRIP = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'].lstrip('\n') + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_whitespace_a_template_drops_from_an_answer_is_not_matched_over_its_own(tmp_path, smollm2_tokenizer):
    """An answer "\\n\\nA" renders exactly as "A" here: the newlines before A are the template's (after its
    think block), so both rows are the same sample, the answer's span starting at A."""
    tok = smollm2_tokenizer
    path = tmp_path / "think_lstrip.jinja"
    path.write_text(THINK_LSTRIP)
    template = get_template(str(path), tok)
    plain = encode_messages(tok, template, [CHAT[0], {"role": "assistant", "content": "Blue."}], "t")
    padded = encode_messages(tok, template, [CHAT[0], {"role": "assistant", "content": "\n\nBlue."}], "t")
    assert list(padded[0]) == list(plain[0]) and list(padded[1]) == list(plain[1])
    assert supervised(tok, *plain) == "Blue.<|im_end|>"


NO_END = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_without_an_end_of_turn_token_is_refused_naming_the_fix(tmp_path, smollm2_tokenizer):
    """Without a special token after the answer the model never learns to stop; and the next turn's
    opening token must not be taken for this answer's end."""
    from sft_core.data.encode import EncodeStats, iter_encoded
    from sft_core.data.spec import EncodeSpec

    tok = smollm2_tokenizer
    path = tmp_path / "no_end.jinja"
    path.write_text(NO_END)
    chat = [*CHAT, {"role": "user", "content": "Another."}, {"role": "assistant", "content": "Red."}]
    text, spans = supervised_char_spans(get_template(str(path), tok), tok, chat, "t")
    assert [text[a:b] for a, b in spans] == ["Blue.", "Red."]  # not "Blue.\n<|im_start|>"
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    with pytest.raises(
        ConfigError, match=r"no_end.jinja' ends an assistant turn with no special token.*eos_token"
    ):
        next(iter_encoded([str(data)], tok, EncodeSpec(64, str(path)), EncodeStats()))
