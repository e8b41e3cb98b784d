"""Load a causal LM for training from a resolved Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def load_causal_lm(model_dir: str | Path, dtype: torch.dtype, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, attn_implementation=attn_implementation
    )
    # Packed rows rely on position_ids restarting per sample with no attention mask; with the KV
    # cache on, transformers builds a mask from the cache length instead and samples attend to each
    # other (measured: STACK.md). Training never needs the cache.
    model.config.use_cache = False
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
