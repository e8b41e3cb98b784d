"""LoRA through the peft library: wrap a loaded model, export its adapter, merge it for release.

Parameter names follow peft (`base_model.model.<hf name>` with `base_layer` / `lora_A` / `lora_B`
inside each adapted linear layer). Only the adapter's weights train; everything else is frozen, so
the exact-resume state holds just the adapter and its optimizer state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from sft_core.config import LoraArgs
from sft_core.errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel


def peft_config(args: LoraArgs) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=args.rank,
        # peft annotates lora_alpha as int but only divides by it (scaling = alpha / r): a float is valid.
        lora_alpha=args.alpha,  # type: ignore[arg-type]
        lora_dropout=args.dropout,
        target_modules=args.target_modules,
        task_type="CAUSAL_LM",
    )


def apply_lora(model: torch.nn.Module, args: LoraArgs) -> PeftModel:
    from peft import PeftModel, get_peft_model

    wrapped = get_peft_model(model, peft_config(args))
    assert isinstance(wrapped, PeftModel)  # mixed=False (the default) always wraps in a PeftModel
    return wrapped


@runtime_checkable
class _Wrapper(Protocol):
    """A peft wrapper: isinstance checks only that the method is there (hasattr)."""

    def get_base_model(self) -> torch.nn.Module: ...


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, _Wrapper) else model


def save_adapter(peft_model: PeftModel, full_state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """adapter_config.json + adapter_model.safetensors, taken from a full (gathered) state dict; the
    config names the base model's folder, so from_pretrained(out_dir) loads base + adapter."""
    peft_model.save_pretrained(str(out_dir), state_dict=full_state, save_embedding_layers=False)


def save_merged(
    model_dir: Path, args: LoraArgs, full_state: dict[str, torch.Tensor], out_dir: Path, dtype: torch.dtype
) -> None:
    """The base model with the adapter folded into its weights: a plain Hugging Face folder."""
    from sft_core.model.load import load_causal_lm

    fresh = apply_lora(load_causal_lm(model_dir, dtype), args)
    fresh.load_state_dict(full_state)
    merged = fresh.merge_and_unload()
    merged.config.use_cache = True  # the exported model generates with its KV cache
    merged.save_pretrained(out_dir, safe_serialization=True)


# Module names whose weight a tied-embedding model shares: an adapter merged into one changes both.
_TIED = ("lm_head", "embed_tokens")


def check_targets(args: LoraArgs, model_dir: str) -> None:
    """Refuse target_modules that would fail or silently do less inside the workers: a name no
    weight of the model ends with (peft adapts the names it finds and drops a misspelt one unseen,
    or fails with a traceback when none match), and the LM head or embeddings of a model that ties
    them (the merged model would fold the head's delta into the input embeddings too)."""
    import json

    from safetensors import safe_open

    if args.target_modules == "all-linear":  # peft leaves out the output head itself
        return
    key = "sft_train.model_args.lora.target_modules"
    stored: set[str] = set()  # modules with a weight of their own in the folder
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as weights:
            stored.update(k.removesuffix(".weight") for k in weights.keys() if k.endswith(".weight"))  # noqa: SIM118 (not a dict)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    # Unset in config.json, the model class's default decides; a head stored apart is not tied.
    tie = config.get("tie_word_embeddings", bool(stored) and "lm_head" not in stored)
    tied = [t for t in args.target_modules if t in _TIED]
    if tied and tie:
        raise ConfigError(
            f"config key '{key}': {tied} in a model whose LM head and input embeddings share one weight "
            "(tie_word_embeddings): the merged model would change both. Leave it out."
        )
    if stored:  # a folder of .bin weights only: left to peft
        names = stored | {"lm_head"}  # a tied head is a module too, its weight stored as the embeddings'
        modules = {n.rsplit(".", 1)[-1] for n in names}
        missing = [t for t in args.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
        if missing:
            raise ConfigError(
                f"config key '{key}': {missing} name no module of {model_dir} (its weights' modules: "
                f"{', '.join(sorted(modules))})"
            )
