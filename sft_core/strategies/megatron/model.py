"""megatron's GPTModel for a mapped Hugging Face architecture: build this rank's chunks, fill them
from the HF checkpoint, and gather them back into a full HF state dict. megatron-core is imported
inside the functions (callers hold the CPU shim active)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sft_core.model import megatron_bridge as bridge
from sft_core.strategies.megatron.layout import MegatronConfig


def transformer_config(shape: bridge.GPTShape, layout: MegatronConfig, dtype: torch.dtype) -> Any:
    """megatron TransformerConfig for a mapped HF architecture and a parallel layout."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        recompute_granularity=layout.recompute_granularity,
        recompute_method=layout.recompute_method,
        recompute_num_layers=layout.recompute_num_layers,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        # Every weight is then overwritten from the HF checkpoint, but megatron 0.16 marks
        # tensor-parallel weights (what the grad norm sums over TP ranks) only while initializing.
        perform_initialization=True,
        attention_backend=AttnBackend.local,
        # Fused kernels need CUDA (and some need Apex / TE); the unfused paths compute the same.
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        deallocate_pipeline_outputs=on_gpu,
        # gloo mismatches batched isend/irecv pairs under the interleaved schedule (VPP): later
        # micro-batches received another's activations (measured); single ops pair correctly.
        batch_p2p_comm=on_gpu,
    )


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm for megatron's local layer spec, usable under sequence parallelism (megatron's
    own torch wrapper refuses it): the weight is marked so that megatron's finalize_model_grads
    all-reduces its gradient over tensor-parallel ranks, each of which saw only a slice of the
    sequence."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


def block_spec(config: Any, vp_stage: int | None) -> Any:
    """This pipeline stage's layers: megatron's local (Transformer-Engine-free) layer spec with
    `RMSNorm` for every norm and SDPA for the core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from sft_core.strategies.megatron.attention import SdpaAttention

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    attention = layer.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SdpaAttention)
    )
    layer = dataclasses.replace(
        layer,
        submodules=dataclasses.replace(
            layer.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm, self_attention=attention
        ),
    )
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=RMSNorm)


def build_chunks(config: Any, shape: bridge.GPTShape, layout: MegatronConfig) -> list[torch.nn.Module]:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    vpp = layout.virtual_pipeline_model_parallel_size
    chunks: list[torch.nn.Module] = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=block_spec(config, stage),
                vocab_size=shape.vocab_size,
                max_sequence_length=shape.max_position_embeddings,
                pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                share_embeddings_and_output_weights=shape.tied_embeddings,
                position_embedding_type="rope",
                rotary_base=shape.rope_theta,
                vp_stage=stage,
            )
        )
    return chunks


def global_name(chunk: torch.nn.Module, name: str, shape: bridge.GPTShape) -> str:
    """A chunk's parameter name with the global layer number (pipeline stages number their layers
    from 0); a tied output layer on the last stage is the word embedding."""
    if name.startswith("decoder.layers."):
        local, rest = name[len("decoder.layers.") :].split(".", 1)
        layer: Any = chunk.decoder.layers[int(local)]  # type: ignore[union-attr, index]
        return f"decoder.layers.{layer.layer_number - 1}.{rest}"
    if name == "output_layer.weight" and shape.tied_embeddings:
        return "embedding.word_embeddings.weight"
    return name


def load_hf_weights(chunks: list[torch.nn.Module], model_dir: Path, shape: bridge.GPTShape) -> int:
    """Every parameter of this rank's chunks from the HF checkpoint: mapped, then TP-sliced.
    Returns the whole model's parameter count (not this rank's part)."""
    from megatron.core import parallel_state as mpu

    from sft_core.model.load import load_hf_state_dict

    full = bridge.hf_to_megatron(load_hf_state_dict(model_dir), shape)
    tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                key = global_name(chunk, name, shape)
                if key not in full:
                    raise RuntimeError(f"megatron parameter '{name}' ({key}) has no HF source")
                piece = bridge.shard_for_rank(key, full[key], tp_rank, tp_size)
                if piece.shape != param.shape:
                    raise RuntimeError(
                        f"{key}: HF gives {tuple(piece.shape)}, megatron has {tuple(param.shape)}"
                    )
                param.copy_(piece)
    return sum(t.numel() for t in full.values())


def gather_hf_state(
    chunks: list[torch.nn.Module], shape: bridge.GPTShape, rank: int
) -> dict[str, torch.Tensor]:
    """Full HF-named weights on global rank 0 ({} on the others); every rank must call it: tensor
    parallel pieces are all-gathered, then pipeline stages gathered to rank 0."""
    from megatron.core import parallel_state as mpu

    tp_group = mpu.get_tensor_model_parallel_group()
    tp_size = mpu.get_tensor_model_parallel_world_size()
    mine: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name == "output_layer.weight" and shape.tied_embeddings:
                continue  # the last stage's copy of the embedding
            data = param.detach()
            if tp_size > 1 and bridge.tp_split_dim(name) is not None:
                pieces = [torch.empty_like(data) for _ in range(tp_size)]
                dist.all_gather(pieces, data.contiguous(), group=tp_group)
                data = bridge.unshard(name, pieces)
            mine[global_name(chunk, name, shape)] = data.float().cpu()
    owner = mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0
    if mpu.get_context_parallel_world_size() > 1:
        owner = owner and mpu.get_context_parallel_rank() == 0
    if not owner:
        return {}
    pp_size = mpu.get_pipeline_model_parallel_world_size()
    if pp_size > 1:
        gathered: list[Any] = [None] * pp_size if mpu.is_pipeline_first_stage() else []
        group = mpu.get_pipeline_model_parallel_group()
        dist.gather_object(mine, gathered or None, dst=dist.get_global_rank(group, 0), group=group)
        if not mpu.is_pipeline_first_stage():
            return {}
        for part in gathered:
            mine.update(part)
    return bridge.megatron_to_hf(mine, shape) if rank == 0 else {}
