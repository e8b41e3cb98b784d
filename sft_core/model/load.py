"""Load a causal LM for training from a resolved Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def load_causal_lm(
    model_dir: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa"
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation=attn_implementation
    )
    # Packed rows rely on position_ids restarting per sample with no attention mask; with the KV
    # cache on, transformers builds a mask from the cache length instead and samples attend to each
    # other (measured: STACK.md). Training never needs the cache.
    model.config.use_cache = False
    # nn.Embedding(padding_idx=pad_token_id) drops the input-side gradient of that token id. Padding
    # positions never influence a target here (right padding, causal attention, ignored labels), so
    # the only effect would be on real occurrences of the id: SmolLM2's pad is <|im_end|>, which ends
    # every turn. Train the true gradient, as megatron_train does.
    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, torch.nn.Embedding):
        embeddings.padding_idx = None
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_hf_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by HF name, read straight from its safetensors files (no model is
    built; used where the weights go into another architecture's modules)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:  # a .bin checkpoint: let transformers read it
        return load_causal_lm(model_dir, torch.float32).state_dict()
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def save_hf_folder(
    hf_config: PreTrainedConfig, model_dir: str | Path, state: dict[str, torch.Tensor], out_dir: Path
) -> None:
    """Write a Hugging Face folder from a full state dict without allocating a second copy of the
    weights (the model skeleton is built on the meta device). Generation settings come from the
    source folder, as with `save_pretrained` on a loaded model."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    model.config.use_cache = True  # the exported model generates with its KV cache
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
