"""Hugging Face <-> megatron-core GPTModel: the architecture mapping and the weight mapping.

Covers the Llama family (Llama 2/3, SmolLM2, Mistral without sliding window) and Qwen2 / Qwen2.5:
grouped-query attention, SwiGLU, RoPE (plain, with its theta), RMSNorm, tied or untied embeddings,
q/k/v biases. Anything else in a config is refused with a message rather than mapped wrongly.

Weights are converted between *full* tensors with HF names and *full* tensors with megatron names
(global layer numbers); `shard_for_rank` / `unshard` turn a full megatron tensor into one tensor
parallel rank's piece and back. Layouts (megatron, local spec)::

    linear_qkv  [groups * (heads_per_group + 2) * head_dim, hidden]   per group: q heads, k, v
    linear_fc1  [2 * ffn, hidden]                                     gate rows, then up rows
    tensor parallel: linear_qkv / embeddings / output_layer split on dim 0 (whole query groups),
    linear_proj / linear_fc2 on dim 1, linear_fc1's gate and up halves split separately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sft_core.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

    from sft_core.strategies.megatron.layout import MegatronConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class GPTShape:
    """What the weight mapping needs to know about the architecture."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    qkv_bias: bool
    tied_embeddings: bool
    rope_theta: float
    norm_eps: float
    max_position_embeddings: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


def gpt_shape(hf_config: PreTrainedConfig) -> GPTShape:
    """Read a Hugging Face config; refuse what the megatron mapping would get wrong."""
    kind = getattr(hf_config, "model_type", "?")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"megatron_train supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; this model is '{kind}'."
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ModelError(
            f"megatron_train: hidden_act '{hf_config.hidden_act}' is not mapped (only silu / SwiGLU)."
        )
    if getattr(hf_config, "mlp_bias", False):
        raise ModelError("megatron_train: MLP biases (mlp_bias=true) are not mapped.")
    if kind != "qwen2" and getattr(hf_config, "attention_bias", False):
        raise ModelError("megatron_train: attention_bias=true (biases on q, k, v and o) is not mapped.")
    if getattr(hf_config, "sliding_window", None) and getattr(
        hf_config, "use_sliding_window", kind != "qwen2"
    ):
        raise ModelError("megatron_train: sliding-window attention is not mapped.")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ModelError(f"megatron_train: RoPE scaling '{rope_type}' is not mapped (only plain RoPE).")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    heads = hf_config.num_attention_heads
    return GPTShape(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=hf_config.vocab_size,
        qkv_bias=kind == "qwen2",
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        rope_theta=float(theta),
        norm_eps=float(hf_config.rms_norm_eps),
        max_position_embeddings=hf_config.max_position_embeddings,
    )


def layout_problems(shape: GPTShape, tp: int, pp: int, vpp: int | None) -> list[str]:
    """Why a (TP, PP, VPP) layout cannot split this model; empty when it can."""
    problems = []
    for what, n in (
        ("attention heads", shape.num_heads),
        ("key/value heads (query groups)", shape.num_query_groups),
        ("vocabulary size", shape.vocab_size),
        ("intermediate (FFN) size", shape.ffn_hidden_size),
    ):
        if n % tp:
            problems.append(f"{what} ({n}) not divisible by tensor_model_parallel_size ({tp})")
    chunks = pp * (vpp or 1)
    if shape.num_layers % chunks:
        what = (
            f"pipeline_model_parallel_size x virtual ({pp} x {vpp})"
            if vpp
            else f"pipeline_model_parallel_size ({pp})"
        )
        problems.append(f"layers ({shape.num_layers}) not divisible by {what}")
    return problems


def check_model_layout(strategy_config: MegatronConfig, model_dir: str | Path) -> None:
    """Stop before any worker starts when the model cannot be split as `strategy_config` asks,
    or megatron cannot represent it."""
    from transformers import AutoConfig

    try:
        shape = gpt_shape(AutoConfig.from_pretrained(str(model_dir)))
    except ModelError as err:
        raise ModelError(f"{model_dir}: {err}") from None
    lay = strategy_config
    problems = layout_problems(
        shape,
        lay.tensor_model_parallel_size,
        lay.pipeline_model_parallel_size,
        lay.virtual_pipeline_model_parallel_size,
    )
    if problems:
        raise ConfigError(
            "config key 'sft_train.strategy_args.strategy_config': this layout cannot split the model "
            f"at {model_dir}: " + "; ".join(problems)
        )


# -- full HF <-> full megatron ---------------------------------------------------------------------

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_RENAMES = {  # per-layer tensors that map one to one
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}


def hf_to_megatron(hf: dict[str, torch.Tensor], shape: GPTShape) -> dict[str, torch.Tensor]:
    """Full HF state dict -> full megatron state dict (global layer numbers, no TP split)."""
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not shape.tied_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(shape.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for src, dst in _RENAMES.items():
            out[m + dst] = hf[p + src]
        attn = p + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], shape
        )
        if shape.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], shape
            )
        out[m + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]]
        )
    return out


def megatron_to_hf(mg: dict[str, torch.Tensor], shape: GPTShape) -> dict[str, torch.Tensor]:
    """Full megatron state dict -> full HF state dict (inverse of `hf_to_megatron`)."""
    out = {
        "model.embed_tokens.weight": mg["embedding.word_embeddings.weight"],
        "model.norm.weight": mg["decoder.final_layernorm.weight"],
    }
    if not shape.tied_embeddings:
        out["lm_head.weight"] = mg["output_layer.weight"]
    for i in range(shape.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        for src, dst in _RENAMES.items():
            out[p + src] = mg[m + dst]
        attn = p + "self_attn."
        q, k, v = _split_qkv(mg[m + "self_attention.linear_qkv.weight"], shape)
        out[attn + "q_proj.weight"], out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = q, k, v
        if shape.qkv_bias:
            q, k, v = _split_qkv(mg[m + "self_attention.linear_qkv.bias"], shape)
            out[attn + "q_proj.bias"], out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = q, k, v
        gate, up = mg[m + "mlp.linear_fc1.weight"].chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
    return out


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: GPTShape) -> torch.Tensor:
    """[heads*d(,H)], [groups*d(,H)] x2 -> [groups*(heads_per_group+2)*d(,H)], grouped per query group."""
    g, d, tail = shape.num_query_groups, shape.head_dim, q.shape[1:]
    fused = torch.cat(
        [q.reshape(g, shape.heads_per_group * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)],
        dim=1,
    )
    return fused.reshape(-1, *tail)


def _split_qkv(fused: torch.Tensor, shape: GPTShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, tail = shape.num_query_groups, shape.head_dim, fused.shape[1:]
    grouped = fused.reshape(g, (shape.heads_per_group + 2) * d, *tail)
    q, k, v = grouped.split([shape.heads_per_group * d, d, d], dim=1)
    return (
        q.reshape(-1, *tail).contiguous(),
        k.reshape(-1, *tail).contiguous(),
        v.reshape(-1, *tail).contiguous(),
    )


# -- tensor parallel split ---------------------------------------------------------------------------

_SPLIT_DIM0 = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
_SPLIT_DIM1 = ("linear_proj.weight", "linear_fc2.weight")


def tp_split_dim(name: str) -> int | None:
    """The dimension a megatron tensor is split on under tensor parallelism (None: replicated)."""
    if name.endswith(_SPLIT_DIM0) or name.endswith("linear_fc1.weight"):
        return 0
    if name.endswith(_SPLIT_DIM1):
        return 1
    return None


def shard_for_rank(name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Tensor parallel rank `tp_rank`'s piece of the full megatron tensor `name`."""
    dim = tp_split_dim(name)
    if dim is None or tp_size == 1:
        return full
    if name.endswith("linear_fc1.weight"):  # gate and up are split separately, then stacked
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def unshard(name: str, pieces: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `shard_for_rank`: the full tensor from every tensor parallel rank's piece."""
    dim = tp_split_dim(name)
    if dim is None or len(pieces) == 1:
        return pieces[0]
    if name.endswith("linear_fc1.weight"):
        halves = [p.chunk(2) for p in pieces]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    return torch.cat(pieces, dim=dim)
