"""`megatron_train`: megatron-core tensor, pipeline and data parallelism (and context parallelism
where Transformer Engine is installed), with megatron's DDP, optimizer and forward-backward schedules.

The step keeps the semantics of the torch strategies: each micro-batch contributes
sum_tokens(CE) / N_global (N_global: supervised targets of the whole global batch), the same AdamW,
lr schedule, clipping on the full-model gradient norm and skipping of non-finite steps. Megatron's
schedule divides each micro-batch loss by the micro-batch count and its DDP averages gradients over
data-parallel ranks; the loss scale below undoes both, so the gradient is exactly the per-token mean.

Packed rows: megatron's RoPE ignores position ids, so each row gets a block-diagonal causal mask
(no token attends across a packed-sample boundary); RoPE is relative, so the scores equal those of
per-sample positions. (On GPU, Transformer Engine's THD format would avoid the T x T mask; it is not
installed here.)
"""

from __future__ import annotations

import math
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sft_core.config import MegatronConfig, SFTConfig
from sft_core.data import IGNORE_INDEX
from sft_core.data.collate import MicroBatch
from sft_core.model import megatron_bridge as bridge
from sft_core.model.load import DTYPES
from sft_core.strategies import megatron_cpu_shim as shim
from sft_core.strategies.base import DistContext
from sft_core.strategies.precision import autocast_dtype
from sft_core.train import rng
from sft_core.train.schedule import lr_factor

# megatron-core announces on import that it falls back from Transformer Engine / Apex to plain torch
# modules, which is the intended path here (STACK.md); keep the run log for what matters.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
warnings.filterwarnings("ignore", message=r"When using async grad allreduce", category=UserWarning)


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
        self.weight.sequence_parallel = config.sequence_parallel


def block_spec(config: Any, vp_stage: int | None) -> Any:
    """This pipeline stage's layers: megatron's local (Transformer-Engine-free) layer spec with
    `RMSNorm` for every norm."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    layer = dataclasses.replace(
        layer,
        submodules=dataclasses.replace(layer.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm),
    )
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=RMSNorm)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True = masked: causal within each packed sample (a sample starts where
    its position id is 0), nothing across samples.

    >>> block_causal_mask(torch.tensor([[0, 1, 0, 1]]))[0, 0].int().tolist()
    [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 0, 0]]
    """
    doc = (position_ids == 0).cumsum(dim=1)
    same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)
    t = position_ids.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return (~(same_doc & causal)).unsqueeze(1)


class MegatronStrategy:
    name = "megatron_train"

    def __init__(self, cfg: SFTConfig, ctx: DistContext):
        self.cfg = cfg
        self.ctx = ctx
        self.args = cfg.sft_train.training_args
        self.layout = cfg.megatron_layout
        requested = DTYPES[cfg.sft_train.model_args.dtype]
        # GPU: megatron's mixed precision (bf16/fp16 weights, fp32 main weights in the optimizer).
        # CPU: fp32 weights, and bf16 autocast of the forward where the CPU has native bf16.
        on_gpu = ctx.device.type == "cuda"
        self.dtype = requested if on_gpu else torch.float32
        self.cpu_autocast = None if on_gpu else autocast_dtype(requested, ctx.device)
        self.skipped_steps = 0
        self.step = 0  # optimizer steps taken (the lr schedule's position)

    # -- layout ------------------------------------------------------------------------------
    @property
    def data_parallel(self) -> tuple[int, int]:
        from megatron.core import parallel_state as mpu

        return mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

    @property
    def reports_metrics(self) -> bool:
        """One rank per data-parallel replica reports loss and tokens: tensor parallel rank 0 of the
        last pipeline stage (the others hold the same loss, or none)."""
        from megatron.core import parallel_state as mpu

        return mpu.get_tensor_model_parallel_rank() == 0 and mpu.is_pipeline_last_stage()

    # -- setup -----------------------------------------------------------------------------------
    def initialize(self, model_dir: Path, total_steps: int) -> None:
        from transformers import AutoConfig

        lay = self.layout
        with shim.active():
            from megatron.core import parallel_state as mpu
            from megatron.core import tensor_parallel
            from megatron.core.distributed import (
                DistributedDataParallel,
                DistributedDataParallelConfig,
                finalize_model_grads,
            )
            from megatron.core.models.gpt import GPTModel
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
            from megatron.core.pipeline_parallel import get_forward_backward_func

            shim.install()
            mpu.destroy_model_parallel()
            mpu.initialize_model_parallel(
                tensor_model_parallel_size=lay.tensor_model_parallel_size,
                pipeline_model_parallel_size=lay.pipeline_model_parallel_size,
                virtual_pipeline_model_parallel_size=lay.virtual_pipeline_model_parallel_size,
                context_parallel_size=lay.context_parallel_size,
                # megatron's own groups get the same bound as the default group (worker_timeout_s).
                distributed_timeout_minutes=max(1, math.ceil(self.cfg.sft_train.worker_timeout_s / 60)),
            )
            tensor_parallel.model_parallel_cuda_manual_seed(self.cfg.seed)
            self.hf_config = AutoConfig.from_pretrained(model_dir)
            self.shape = bridge.gpt_shape(self.hf_config)
            self.model_dir = model_dir
            config = transformer_config(self.shape, lay, self.dtype)
            vpp = lay.virtual_pipeline_model_parallel_size
            chunks = []
            for vp_stage in range(vpp or 1):
                stage = vp_stage if vpp else None
                chunks.append(
                    GPTModel(
                        config=config,
                        transformer_layer_spec=block_spec(config, stage),
                        vocab_size=self.shape.vocab_size,
                        max_sequence_length=self.shape.max_position_embeddings,
                        pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                        post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                        share_embeddings_and_output_weights=self.shape.tied_embeddings,
                        position_embedding_type="rope",
                        rotary_base=self.shape.rope_theta,
                        vp_stage=stage,
                    )
                )
            self._load_hf_weights(chunks, model_dir)
            self.modules = chunks
            if self.ctx.device.type == "cuda":
                for c in chunks:
                    c.cuda(torch.cuda.current_device())
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=lay.use_distributed_optimizer,
            )
            self.chunks = [
                DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
                for i, c in enumerate(chunks)
            ]
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer="adam",
                    lr=self.args.learning_rate,
                    weight_decay=self.args.weight_decay,
                    adam_beta1=self.args.adam_beta1,
                    adam_beta2=self.args.adam_beta2,
                    adam_eps=self.args.adam_epsilon,
                    clip_grad=0.0,  # clipping is done in train_step, after the finiteness check
                    bf16=config.bf16,
                    fp16=config.fp16,
                    params_dtype=self.dtype,
                    use_distributed_optimizer=lay.use_distributed_optimizer,
                ),
                self.chunks,
            )
            config.grad_scale_func = self.optimizer.scale_loss
            config.finalize_model_grads_func = finalize_model_grads
            self.config = config
            self.forward_backward = get_forward_backward_func()
        self.total_steps = total_steps
        self.warmup = self.args.warmup_steps or math.ceil(self.args.warmup_ratio * total_steps)
        self._set_lr()

    def _load_hf_weights(self, chunks: list[torch.nn.Module], model_dir: Path) -> None:
        """Every parameter of this rank's chunks from the HF checkpoint: mapped, then TP-sliced."""
        from megatron.core import parallel_state as mpu

        from sft_core.model.load import load_hf_state_dict

        full = bridge.hf_to_megatron(load_hf_state_dict(model_dir), self.shape)
        self.num_params = sum(t.numel() for t in full.values())  # the whole model, not this rank's part
        tp_rank, tp_size = mpu.get_tensor_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size()
        with torch.no_grad():
            for chunk in chunks:
                for name, param in chunk.named_parameters():
                    key = self._global_name(chunk, name)
                    if key not in full:
                        raise RuntimeError(f"megatron parameter '{name}' ({key}) has no HF source")
                    piece = bridge.shard_for_rank(key, full[key], tp_rank, tp_size)
                    if piece.shape != param.shape:
                        raise RuntimeError(
                            f"{key}: HF gives {tuple(piece.shape)}, megatron has {tuple(param.shape)}"
                        )
                    param.copy_(piece)

    def _global_name(self, chunk: torch.nn.Module, name: str) -> str:
        """A chunk's parameter name with the global layer number (pipeline stages number their
        layers from 0); a tied output layer on the last stage is the word embedding."""
        if name.startswith("decoder.layers."):
            local, rest = name[len("decoder.layers.") :].split(".", 1)
            return f"decoder.layers.{chunk.decoder.layers[int(local)].layer_number - 1}.{rest}"
        if name == "output_layer.weight" and self.shape.tied_embeddings:
            return "embedding.word_embeddings.weight"
        return name

    def _set_lr(self) -> None:
        factor = lr_factor(
            self.step, self.total_steps, self.warmup, self.args.lr_scheduler_type, self.args.min_lr_ratio
        )
        self.lr = self.args.learning_rate * factor
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    # -- batches ---------------------------------------------------------------------------------
    def _megatron_batches(
        self, micro_batches: list[MicroBatch]
    ) -> tuple[list[dict[str, torch.Tensor]], int, int]:
        """Pad every micro-batch to one [rows, width] shape (pipeline stages exchange fixed-shape
        activations), shift labels to megatron's convention (labels[t] is the target of token t) and
        turn ignored targets into a loss mask (megatron has no ignore index)."""
        lay = self.layout
        rows = max(self.args.per_device_train_batch_size, max(mb.input_ids.size(0) for mb in micro_batches))
        width = max(mb.input_ids.size(1) for mb in micro_batches)
        multiple = math.lcm(
            lay.tensor_model_parallel_size if lay.sequence_parallel else 1, 2 * lay.context_parallel_size
        )
        width = -(-width // multiple) * multiple
        count = len(micro_batches)
        if lay.virtual_pipeline_model_parallel_size:  # the interleaved schedule needs a multiple of PP
            pp = lay.pipeline_model_parallel_size
            count = -(-count // pp) * pp
        out = []
        for i in range(count):
            input_ids = torch.zeros(rows, width, dtype=torch.long)
            labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
            positions = torch.arange(width).repeat(rows, 1)
            if i < len(micro_batches):
                mb = micro_batches[i]
                b, t = mb.input_ids.shape
                input_ids[:b, :t], positions[:b, :t] = mb.input_ids, mb.position_ids
                labels[:b, : t - 1] = mb.labels[:, 1:]
                positions[:b, t:] = torch.arange(width - t)  # padding: a sample of its own
            loss_mask = labels != IGNORE_INDEX
            batch = {
                "input_ids": input_ids,
                "position_ids": positions,
                "labels": labels.masked_fill(~loss_mask, 0),
                "loss_mask": loss_mask.float(),
            }
            batch = {k: v.to(self.ctx.device) for k, v in batch.items()}
            batch["attention_mask"] = block_causal_mask(batch["position_ids"])  # built where it is used
            out.append(batch)
        return out, rows, width

    def _forward_step(
        self, data_iterator: Any, model: torch.nn.Module, scale: float
    ) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        with torch.autocast("cpu", dtype=self.cpu_autocast, enabled=self.cpu_autocast is not None):
            per_token = model(
                batch["input_ids"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
            )
        return per_token, partial(_masked_loss, batch["loss_mask"], scale)

    def _run_schedule(
        self, micro_batches: list[MicroBatch], scale: float | None, forward_only: bool
    ) -> tuple[float, int]:
        batches, rows, width = self._megatron_batches(micro_batches)
        if scale is not None:
            scale = scale * len(batches)  # megatron divides each micro-batch loss by their count
        chunks = len(self.chunks)
        iterators = [iter(batches) for _ in range(chunks)] if chunks > 1 else iter(batches)
        results = self.forward_backward(
            forward_step_func=partial(self._forward_step, scale=scale or 0.0),
            data_iterator=iterators,
            model=self.chunks if chunks > 1 else self.chunks[0],
            num_microbatches=len(batches),
            seq_length=width,
            micro_batch_size=rows,
            forward_only=forward_only,
        )
        if not self.reports_metrics:
            return 0.0, 0
        return float(sum(float(r["loss_sum"]) for r in results)), int(sum(int(r["targets"]) for r in results))

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch], num_targets: int) -> dict[str, float]:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        with shim.active():
            for c in self.chunks:
                c.train()
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
            _, dp_size = self.data_parallel
            t0 = time.perf_counter()
            # DDP averages over data-parallel ranks: x dp_size turns that into the sum over ranks.
            loss_sum, targets = self._run_schedule(micro_batches, dp_size / max(num_targets, 1), False)
            self._sync()
            t1 = time.perf_counter()
            self.optimizer.prepare_grads()
            grad_norm = self._grad_norm()
            lr = self.lr
            if math.isfinite(grad_norm):
                max_norm = self.args.max_grad_norm
                if max_norm > 0:
                    for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                        clip_grad_by_total_norm_fp32(opt.get_parameters(), max_norm, grad_norm)
                self.optimizer.step_with_ready_grads()
            else:
                self.skipped_steps += 1  # a non-finite gradient never reaches the weights
            self.step += 1
            self._set_lr()
            self._sync()
        return {
            "loss_sum": loss_sum,
            "targets": targets,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped_steps": self.skipped_steps,
            "time_fwd_bwd": t1 - t0,
            "time_comm": None,  # megatron runs its collectives internally
            "time_optimizer": time.perf_counter() - t1,
        }

    @torch.no_grad()
    def _grad_norm(self) -> float:
        """Norm of the full model's gradient, accumulated in float64: megatron's float32 norm
        differs with the layout by up to ~4e-5 (relative), which would make clipping layout-dependent.
        Each gradient is counted once (no tensor-parallel replicas, no tied copies)."""
        optimizers = _optimizers(self.optimizer)
        squares = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for opt in optimizers:
            for grad in opt.get_main_grads_for_grad_norm():
                squares += torch.linalg.vector_norm(grad, dtype=torch.float64) ** 2
        dist.all_reduce(squares, group=optimizers[0].get_grad_stats_parallel_group())
        return float(squares.sqrt())

    @torch.no_grad()
    def eval_step(self, micro_batches: list[MicroBatch]) -> tuple[float, int]:
        with shim.active():
            for c in self.chunks:
                c.eval()
            return self._run_schedule(micro_batches, None, True)

    def _sync(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()

    # -- export --------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full HF-named weights on global rank 0 ({} on the others); every rank must call it:
        tensor parallel pieces are all-gathered, then pipeline stages gathered to rank 0."""
        from megatron.core import parallel_state as mpu

        tp_group = mpu.get_tensor_model_parallel_group()
        tp_size = mpu.get_tensor_model_parallel_world_size()
        mine: dict[str, torch.Tensor] = {}
        for chunk in self.modules:
            for name, param in chunk.named_parameters():
                if name == "output_layer.weight" and self.shape.tied_embeddings:
                    continue  # the last stage's copy of the embedding
                data = param.detach()
                if tp_size > 1 and bridge.tp_split_dim(name) is not None:
                    pieces = [torch.empty_like(data) for _ in range(tp_size)]
                    dist.all_gather(pieces, data.contiguous(), group=tp_group)
                    data = bridge.unshard(name, pieces)
                mine[self._global_name(chunk, name)] = data.float().cpu()
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
        return bridge.megatron_to_hf(mine, self.shape) if self.ctx.rank == 0 else {}

    def save_hf(self, out_dir: Path, tokenizer: Any, final: bool = False) -> None:
        with shim.active():
            state = self.full_state_dict()
        if not self.ctx.is_main:
            return
        from sft_core.model.load import save_hf_folder

        save_hf_folder(self.hf_config, self.model_dir, state, out_dir)
        tokenizer.save_pretrained(out_dir)

    # -- exact resume ----------------------------------------------------------------------------------
    def save_state(self, out_dir: Path) -> None:
        """This rank's shards as megatron holds them: model chunks, optimizer (the distributed
        optimizer's shard of Adam state), step, RNG. Resume needs the same layout; a new layout
        starts from the checkpoint's HF folder instead."""
        from megatron.core import tensor_parallel

        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": [c.state_dict() for c in self.modules],
                "optimizer": [o.optimizer.state_dict() for o in _optimizers(self.optimizer)],
                "step": self.step,
                "skipped_steps": self.skipped_steps,
                "rng": {
                    **rng.capture(self.ctx.device),
                    "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
                },
                "layout": self.layout.model_dump(),
            },
            out_dir / f"megatron_rank{self.ctx.rank}.pt",
        )

    def load_state(self, state_dir: Path) -> None:
        from megatron.core import tensor_parallel

        path = state_dir / f"megatron_rank{self.ctx.rank}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no megatron state for rank {self.ctx.rank} (was the layout changed?)"
            )
        own = rng.load_state_file(path)
        if own["layout"] != self.layout.model_dump():
            raise ValueError(
                f"{path}: saved with megatron layout {own['layout']}, this run uses {self.layout.model_dump()}. "
                "Exact resume needs the same layout; start a new run from the checkpoint's HF folder instead."
            )
        with shim.active():
            for chunk, sd in zip(self.modules, own["model"], strict=True):
                chunk.load_state_dict(sd)
            for opt, sd in zip(_optimizers(self.optimizer), own["optimizer"], strict=True):
                opt.optimizer.load_state_dict(sd)
                opt.reload_model_params()
        self.step, self.skipped_steps = own["step"], own["skipped_steps"]
        self._set_lr()
        rng.restore(own["rng"], self.ctx.device)
        tensor_parallel.get_cuda_rng_tracker().set_states(own["rng"]["tracker"])

    def num_parameters(self) -> int:
        return self.num_params


def _masked_loss(loss_mask: torch.Tensor, scale: float, per_token: torch.Tensor) -> tuple[torch.Tensor, dict]:
    summed = (per_token.float() * loss_mask).sum()
    return summed * scale, {"loss_sum": summed.detach(), "targets": loss_mask.sum().detach()}


def _optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))
