"""Chat templates: render a conversation to text, and find which characters are supervised.

`native` uses the tokenizer's own chat_template; the built-ins are Jinja strings; a path to a
`.jinja` file is read as a custom template. Whatever the template, supervision is found from
character spans of the rendered text (not by re-tokenizing a prompt), so a default system prompt
that the template injects, role headers and the generation prompt are never supervised.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sft_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from collections.abc import Callable

    from jinja2 import Template
    from transformers import PreTrainedTokenizerBase

    from sft_core.data.messages import Message

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2.5 without tools: ChatML with Qwen's default system prompt.
QWEN2_5 = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3 in non-thinking form: each assistant turn carries an empty think block, as the model emits it;
# an answer that brings its own think block (reasoning data) is written as it is, not given a second.
# Unlike Qwen3's own template, earlier turns keep their think blocks, so one sample trains every turn
# (README: multi-turn Qwen3).
QWEN3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message['content'].lstrip().startswith('<think>') %}"
    "{{ '<|im_start|>assistant\n' + message['content'] + '<|im_end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# QWEN3 as a checkpoint carries it: an answer trained after an empty think block it did not write
# (supervise_empty_think: false) is prompted with that block, as Qwen3's own template does with
# enable_thinking=False; `enable_thinking` passed to apply_chat_template decides where given.
_QWEN3_PROMPT = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
_QWEN3_PROMPT_FOR_INFERENCE = (
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if not (enable_thinking if enable_thinking is defined else THINKS) %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML, "qwen2_5": QWEN2_5, "qwen3": QWEN3, "llama3": LLAMA3}
# The special tokens each built-in writes: a tokenizer without them would split them into plain
# text pieces, and the model would never see a real end-of-turn token.
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
TEMPLATE_TOKENS = {
    "chatml": _CHATML_TOKENS,
    "qwen2_5": _CHATML_TOKENS,
    "qwen3": _CHATML_TOKENS,
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    source: str | None  # Jinja text; None means the tokenizer's own template
    supervise_empty_think: bool = False  # train on an empty <think></think> block (Qwen3) too

    def render(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: list[Message],
        add_generation_prompt: bool = False,
    ) -> str:
        """Same text as `tokenizer.apply_chat_template(..., tokenize=False)`, through transformers'
        own compiled Jinja environment but without its per-call preprocessing (encoding renders 2-3
        times per row). Falls back to apply_chat_template if that private API moves."""
        compiled = _compiled(self.source or tokenizer.chat_template)
        if compiled is None:
            text = tokenizer.apply_chat_template(
                messages,
                chat_template=self.source,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            assert isinstance(text, str)  # one conversation, tokenize=False: text (typed for every mode)
            return text
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map
        )


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> Template | None:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # private API: keep working (slower) if it is renamed
        return None
    return _compile_jinja_template(source)


def get_template(
    name: str, tokenizer: PreTrainedTokenizerBase, supervise_empty_think: bool = False
) -> ChatTemplate:
    return dataclasses.replace(_named_template(name, tokenizer), supervise_empty_think=supervise_empty_think)


def carry_template(
    name: str, tokenizer: PreTrainedTokenizerBase, supervise_empty_think: bool = False
) -> None:
    """Make `name` (the template a model is trained with) the tokenizer's own chat template, so a
    checkpoint's tokenizer formats prompts as training did: apply_chat_template, MLflow's pyfunc,
    `mlflow models serve`. The tokenizer's native template is left as it is. The built-in qwen3's
    generation prompt holds the empty think block that training put before answers without
    reasoning, unless the model learned to write it (`supervise_empty_think`) or the caller passes
    enable_thinking=True."""
    if name == "qwen3":
        thinks = "true" if supervise_empty_think else "false"
        tokenizer.chat_template = QWEN3.replace(
            _QWEN3_PROMPT, _QWEN3_PROMPT_FOR_INFERENCE.replace("THINKS", thinks)
        )
    elif name != "native":
        tokenizer.chat_template = _named_template(name, tokenizer).source


def _named_template(name: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    if name == "native":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "config key 'sft_train.data_args.template': 'native' asks for the tokenizer's chat template, "
                f"but this tokenizer has none. Use one of: {', '.join(BUILTIN_TEMPLATES)}, or a .jinja file."
            )
        return ChatTemplate("native", _native_source(tokenizer))
    if name in BUILTIN_TEMPLATES:
        check_template_tokens(name, tokenizer)
        return ChatTemplate(name, BUILTIN_TEMPLATES[name])
    if name.endswith(".jinja"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(
                f"config key 'sft_train.data_args.template': template file '{name}' does not exist"
            )
        return ChatTemplate(name, path.read_text(encoding="utf-8"))
    raise ConfigError(
        f"config key 'sft_train.data_args.template' (or global_template): unknown template '{name}'. "
        f"Use 'native', one of {', '.join(BUILTIN_TEMPLATES)}, or a path to a .jinja file."
    )


def _native_source(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own template. A tokenizer may carry several named ones (a list of
    {name, template} in tokenizer_config.json, a dict once loaded): use the one named "default", as
    apply_chat_template does without tools."""
    source = tokenizer.chat_template
    if isinstance(source, list | tuple):
        source = {t["name"]: t["template"] for t in source}
    if isinstance(source, dict):
        if "default" not in source:
            raise ConfigError(
                "config key 'sft_train.data_args.template': 'native' asks for the tokenizer's chat template, "
                "but it has several and no template named 'default' "
                f"(it has {', '.join(map(repr, sorted(source)))}). "
                "Give the one to train with as a .jinja file, or use a built-in template."
            )
        source = source["default"]
    assert isinstance(source, str)
    return source


def check_template_tokens(name: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """A built-in template needs its special tokens to be single tokens of this tokenizer."""
    known = set(special_tokens(tokenizer))
    missing = [t for t in TEMPLATE_TOKENS.get(name, ()) if t not in known]
    if missing:
        raise ConfigError(
            f"config key 'sft_train.data_args.template' (or global_template): template '{name}' writes "
            f"{', '.join(missing)}, which this tokenizer does not have as special tokens, so the model would "
            "see them as plain text. Use 'native' (the tokenizer's own template) or a template for this model."
        )


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Special and added tokens, longest first (for matching the end-of-turn token); cached per tokenizer."""
    cache: tuple[int, list[str]] | None = getattr(tokenizer, "_sft_special_tokens", None)
    if cache is None or cache[0] != len(tokenizer):  # first call, or tokens were added since
        tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        cache = (len(tokenizer), sorted(tokens, key=len, reverse=True))
        tokenizer._sft_special_tokens = cache
    return cache[1]


# Control characters a vocabulary may lack (tab, newline and carriage return are left to the
# tokenizer's own normalisation, which real data relies on).
_CONTROL_CHARS = [chr(c) for c in (*range(0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, *range(0x80, 0xA0))]


def forbidden_text(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str] | None:
    """A pattern matching what a row's content may not hold, or None: the tokenizer's special
    tokens (group `special`; the tokenizer reads these strings as control tokens wherever they are,
    so in content they would forge turn boundaries and labels) and the control characters it cannot
    encode (group `lost`; it would drop them from the text unseen). Cached per tokenizer."""
    cache: tuple[int, re.Pattern[str] | None] | None = getattr(tokenizer, "_sft_forbidden_text", None)
    if cache is None or cache[0] != len(tokenizer):  # first call, or tokens were added since
        added = (t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        tokens = sorted(set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True)
        lost = [
            c
            for c in _CONTROL_CHARS
            if c not in tokenizer.decode(tokenizer.encode(f"a{c}b", add_special_tokens=False))
        ]
        parts = [f"(?P<special>{'|'.join(map(re.escape, tokens))})"] if tokens else []
        parts += [f"(?P<lost>[{''.join(map(re.escape, lost))}])"] if lost else []
        cache = (len(tokenizer), re.compile("|".join(parts)) if parts else None)
        tokenizer._sft_forbidden_text = cache
    return cache[1]


def _probe(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str | None] | None:
    """(a probe conversation as the template renders it, the special token ending its answer or None),
    or None if the template refuses the probe."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text, spans = supervised_char_spans(template, tokenizer, probe, "probe")
    except DataError:
        return None
    start, end = spans[-1]
    return text, next((s for s in special_tokens(tokenizer) if text.endswith(s, start, end)), None)


def end_of_turn_token(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token this template ends an assistant turn with (e.g. <|im_end|>, <|eot_id|>),
    found by rendering a probe conversation; None if it ends turns without one (or the probe fails)."""
    probed = _probe(template, tokenizer)
    return probed[1] if probed else None


def check_ends_turns(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> None:
    """A template must end an assistant turn with a special token: trained without one, a model
    never learns to stop. (A template that refuses the probe conversation is left to its rows.)"""
    probed = _probe(template, tokenizer)
    if probed is not None and probed[1] is None:
        fix = (
            f"{{{{ eos_token }}}} (this tokenizer's: {tokenizer.eos_token!r})"
            if tokenizer.eos_token
            else "a special token of this tokenizer"
        )
        raise ConfigError(
            f"config key 'sft_train.data_args.template' (or global_template): template '{template.name}' "
            f"ends an assistant turn with no special token after the answer ({probed[0][-60:]!r}), so a "
            f"model trained with it would never learn to stop. Write one after the assistant's content, "
            f"e.g. {fix}."
        )


def end_of_turn_id(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of `end_of_turn_token`, or None."""
    token = end_of_turn_token(template, tokenizer)
    found = tokenizer.convert_tokens_to_ids(token) if token else None
    return found if isinstance(found, int) else None  # one token in, one id out (typed for lists too)


_EMPTY_THINK = re.compile(r"^\s*<think>\s*</think>\s*$")
_LEADING_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")


def _rendered_content(
    raw: str, i: int, chat: list[dict[str, Any]], turn: str, render: Callable[[int], str]
) -> list[str]:
    """The forms of turn `i`'s content to look for, likeliest first. A form with less whitespace
    that renders the very same conversation up to that turn (`turn`) is what the template writes (Qwen3 drops an
    answer's leading newlines, llama3 trims): the whitespace left over in the text is the template's,
    generated after the prompt as at inference, so it must not be matched as the answer's."""
    stripped = [c for c in dict.fromkeys((raw.strip(), raw.lstrip(), raw.rstrip())) if c != raw]
    for candidate in stripped:
        chat[i]["content"] = candidate
        try:
            same = render(i + 1) == turn
        except DataError:  # a template that refuses the stripped form: not the one it writes
            same = False
        finally:
            chat[i]["content"] = raw
        if same:
            return [candidate]
    return [raw, *stripped]


def supervised_char_spans(
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    where: str,
    only_last: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return (text, [(start, end)]) of each assistant turn's supervised chars
    (`only_last`: of the last assistant turn alone), less the turns the data marks untrained
    (`"train": False`, from a weight of 0).

    A span covers what the model must generate after the generation prompt: the assistant content
    plus the end-of-turn token right after it, e.g. with ChatML::

        <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n
                                                             ^^^^^^^^^^^^^^^^ supervised

    Where the generation prompt ends is found by rendering the conversation up to that turn with
    add_generation_prompt=True (a template whose rendering of a prefix of the conversation is not a
    prefix of the whole rendering is refused). Only the supervised turns are checked: a template
    that renders history otherwise than the newest turn (Qwen3's own drops earlier turns'
    reasoning) still renders a conversation's last turn exactly as at inference. Text a template
    inserts between the generation prompt and the content is supervised too (the model generates
    it), except an empty `<think></think>` block (Qwen3), which would teach the model nothing but
    the format.
    """

    chat = [{k: v for k, v in m.items() if k != "train"} for m in messages]  # what a template sees

    def render(upto: int, add_generation_prompt: bool = False) -> str:
        try:
            return template.render(tokenizer, chat[:upto], add_generation_prompt)
        except Exception as err:  # a template's raise_exception, or Jinja tripping on this row's values
            raise DataError(
                f"{where}: template '{template.name}' failed on this row: {type(err).__name__}: {err}"
            ) from None

    text = render(len(messages))
    specials = special_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    answers = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    trained = [i for i in (answers[-1:] if only_last else answers) if messages[i].get("train", True)]
    if not trained:
        which = "its last assistant turn has" if only_last else "all its assistant turns have"
        raise DataError(f"{where}: {which} weight 0, so nothing would be trained on.")
    for i in trained:
        message = messages[i]
        prompt = render(i, add_generation_prompt=True)
        turn = text if i == len(messages) - 1 else render(i + 1)
        # An opening assistant turn (a greeting): a template may write a default system prompt
        # before it that the rendering of no messages lacks. Only its content and end token are
        # supervised then.
        opening = i == 0 and not text.startswith(prompt)
        if opening:
            prompt = ""
        if not (text.startswith(prompt) and text.startswith(turn)):
            raise DataError(
                f"{where}: template '{template.name}' renders turn {i + 1} differently inside the whole "
                "conversation than on its own (as inference renders it), so its answer cannot be "
                "trained in place. Train each answer in a sample of its own, its history rendered as "
                "at inference (supervise=each_assistant_turn_as_sample), the last turn only "
                "(supervise=last_assistant_turn), or use a template whose earlier turns do not change "
                "with later ones (e.g. chatml)."
            )
        start = len(prompt)
        # The content as rendered: raw first (ChatML keeps a trailing "\n"), then as a trimming
        # template (llama3's `| trim`) renders it (all-whitespace content: trimmed to nothing).
        # The content ends at or before the turn's last special token (its end-of-turn token), so
        # it is searched backwards from there: a whitespace-only answer, or one that repeats text a
        # template inserts first (Qwen3's "<think>"), is found where it really is.
        limit = max((text.rfind(s, start, len(turn)) for s in specials), default=-1)
        limit = len(turn) if limit < 0 else limit
        raw = message["content"]
        pos, content = -1, raw
        for candidate in _rendered_content(raw, i, chat, turn, render):
            pos = text.rfind(candidate, start, limit)
            if pos >= 0:
                content = candidate
                break
        if pos < 0:
            raise DataError(
                f"{where}: template '{template.name}' does not render assistant turn {i + 1}'s content as "
                "given (it rewrites it), so its span cannot be located."
            )
        # Between the generation prompt and the content: whitespace or a think block the model
        # generates, so supervised (an empty think block only when asked). An empty block the data
        # writes at the start of the answer renders the same text as one the template inserts, so
        # it is left out the same way.
        between = text[start:pos]
        end = pos + len(content)
        if opening or (_EMPTY_THINK.match(between) and not template.supervise_empty_think):
            start = pos
        if (
            not between.strip()
            and not template.supervise_empty_think
            and (lead := _LEADING_EMPTY_THINK.match(text, pos, end))
        ):
            start = lead.end()
        # Whitespace a template puts between the content and its end-of-turn token is generated
        # too: the end token must be supervised whatever the answer ends with.
        # Only the turn's own rendering: a template that ends turns without a special token must not
        # have the next turn's opening token trained as this answer's end.
        after = text[end : len(turn)]
        gap = len(after) - len(after.lstrip())
        end_token = next((s for s in specials if turn.startswith(s, end + gap)), "")
        if end_token:
            end += gap + len(end_token)
        spans.append((start, end))
    return text, spans
