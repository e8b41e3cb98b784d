"""MegatronStrategy: megatron-core's DDP, optimizer and forward-backward schedules behind `Strategy`.

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

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sft_core.config import SFTConfig
from sft_core.data.collate import MicroBatch
from sft_core.model import megatron_bridge as bridge
from sft_core.model.load import DTYPES
from sft_core.strategies.base import DistContext, Strategy
from sft_core.strategies.megatron import cpu_shim as shim
from sft_core.strategies.megatron import model as mmodel
from sft_core.strategies.megatron.batches import masked_loss, megatron_batches
from sft_core.strategies.megatron.layout import MegatronConfig
from sft_core.strategies.precision import autocast_dtype
from sft_core.train.schedule import lr_factor
from sft_core.train.stats import EvalSums, StepStats

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# What megatron-core says that is expected here: it falls back from Transformer Engine / Apex to
# plain torch modules (the intended path on these machines), and two notices about settings we set.
_EXPECTED_WARNINGS = (
    r".*(Transformer Engine|Apex).*not installed",
    r"full scope is deprecated",
    r"When using async grad allreduce",
)


@contextlib.contextmanager
def in_megatron() -> Iterator[None]:
    """Around every call into megatron-core: the CPU shim (inactive with CUDA) and its expected
    warnings silenced, for this call only."""
    with shim.active(), warnings.catch_warnings():
        for pattern in _EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        yield


class MegatronStrategy(Strategy):
    name = "megatron_train"
    state_format = "megatron"  # megatron_rank<r>.pt: each rank's shards as megatron holds them

    def __init__(self, cfg: SFTConfig, ctx: DistContext):
        super().__init__(cfg, ctx)
        self.layout = self.layout_of(cfg)
        requested = DTYPES[cfg.sft_train.model_args.dtype]
        # GPU: megatron's mixed precision (bf16/fp16 weights, fp32 main weights in the optimizer).
        # CPU: fp32 weights, and bf16 autocast of the forward where the CPU has native bf16.
        on_gpu = ctx.device.type == "cuda"
        self.dtype = requested if on_gpu else torch.float32
        self.cpu_autocast = None if on_gpu else autocast_dtype(requested, ctx.device)
        if self.cpu_autocast is not None and self.compute_dtype(cfg, ctx.device) == torch.float32:
            # Megatron sizes these buffers by its weights' dtype; bf16 autocast over fp32 weights breaks them.
            why = (
                "sequence_parallel: its backward reduce-scatters into a buffer of the weights' dtype"
                if self.layout.sequence_parallel
                else "pipeline stages: a stage's activations are received into buffers of the weights' dtype"
            )
            log.warning("megatron_train trains in fp32 on CPU with %s", why)
            self.cpu_autocast = None
        self.step = 0  # optimizer steps taken (the lr schedule's position)

    # -- decided before workers start ------------------------------------------------------------
    @classmethod
    def compute_dtype(cls, cfg: SFTConfig, device: torch.device) -> torch.dtype:
        layout = cls.layout_of(cfg)
        if device.type != "cuda" and (layout.sequence_parallel or layout.pipeline_model_parallel_size > 1):
            return torch.float32  # see __init__
        return super().compute_dtype(cfg, device)

    @classmethod
    def state_layout(cls, cfg: SFTConfig) -> dict[str, Any] | None:
        return cls.layout_of(cfg).state_layout(cfg.data_parallel_size)

    @staticmethod
    def layout_of(cfg: SFTConfig) -> MegatronConfig:
        layout = cfg.sft_train.strategy_args.strategy_config
        assert isinstance(layout, MegatronConfig), "the registry pairs megatron_train with MegatronConfig"
        return layout

    @classmethod
    def preflight(cls, cfg: SFTConfig, model_dir: str) -> None:
        bridge.check_model_layout(cls.layout_of(cfg), model_dir)

    @classmethod
    def describe(cls, cfg: SFTConfig) -> str:
        return f"{cls.name}: {cls.layout_of(cfg).describe()} x data {cfg.data_parallel_size}"

    @classmethod
    def needs_process_group(cls, world_size: int) -> bool:
        return True  # megatron's parallel state needs one even for a single worker

    # -- layout --------------------------------------------------------------------------------------
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

    # -- setup -----------------------------------------------------------------------------------------
    def initialize(self, model_dir: Path, total_steps: int) -> None:
        from transformers import AutoConfig

        with in_megatron():
            _import_megatron()
            self._init_parallel_state()
            self.hf_config = AutoConfig.from_pretrained(model_dir)
            self.shape = bridge.gpt_shape(self.hf_config)
            self.model_dir = model_dir
            self.config = mmodel.transformer_config(self.shape, self.layout, self.dtype)
            self.modules = mmodel.build_chunks(self.config, self.shape, self.layout)
            self.num_params = mmodel.load_hf_weights(self.modules, model_dir, self.shape)
            if self.ctx.device.type == "cuda":
                for c in self.modules:
                    c.cuda(torch.cuda.current_device())
            self._wrap_and_build_optimizer()
        self.total_steps = total_steps
        self.warmup = self.args.warmup_steps or math.ceil(self.args.warmup_ratio * total_steps)
        self._set_lr()

    def _init_parallel_state(self) -> None:
        from megatron.core import parallel_state as mpu
        from megatron.core import tensor_parallel

        lay = self.layout
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

    def _wrap_and_build_optimizer(self) -> None:
        """megatron's DDP around each chunk (gradients in fp32 buffers), its optimizer over them,
        and the schedule that runs forward and backward over micro-batches and pipeline stages."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.pipeline_parallel import get_forward_backward_func

        config, lay = self.config, self.layout
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=lay.use_distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0)
            for i, c in enumerate(self.modules)
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
        self.forward_backward = get_forward_backward_func()

    def _set_lr(self) -> None:
        factor = lr_factor(
            self.step, self.total_steps, self.warmup, self.args.lr_scheduler_type, self.args.min_lr_ratio
        )
        self.lr = self.args.learning_rate * factor
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    # -- the schedule ----------------------------------------------------------------------------------
    def _forward_step(
        self, data_iterator: Any, model: torch.nn.Module, scale: float
    ) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        per_token = model(
            batch["input_ids"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
        )
        return per_token, partial(masked_loss, batch["loss_mask"], scale)

    def _run_schedule(
        self, micro_batches: list[MicroBatch], scale: float | None, forward_only: bool
    ) -> EvalSums:
        mb = megatron_batches(
            micro_batches, self.layout, self.args.per_device_train_batch_size, self.ctx.device
        )
        if scale is not None:
            scale = scale * len(mb.batches)  # megatron divides each micro-batch loss by their count
        chunks = len(self.chunks)
        iterators = [iter(mb.batches) for _ in range(chunks)] if chunks > 1 else iter(mb.batches)
        # CPU bf16 autocast spans the backward too: megatron's linear layers are autograd Functions
        # whose backward restores autocast for CUDA only, so outside it a bf16 gradient would meet
        # an fp32 weight in their matmul.
        with torch.autocast("cpu", dtype=self.cpu_autocast, enabled=self.cpu_autocast is not None):
            results = self.forward_backward(
                forward_step_func=partial(self._forward_step, scale=scale or 0.0),
                data_iterator=iterators,
                model=self.chunks if chunks > 1 else self.chunks[0],
                num_microbatches=len(mb.batches),
                seq_length=mb.width,
                micro_batch_size=mb.rows,
                forward_only=forward_only,
            )
        if not self.reports_metrics:
            return EvalSums()
        return EvalSums(
            float(sum(float(r["loss_sum"]) for r in results)), int(sum(int(r["targets"]) for r in results))
        )

    # -- the step ----------------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch], num_targets: int) -> StepStats:
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        with in_megatron():
            for c in self.chunks:
                c.train()
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
            _, dp_size = self.data_parallel
            t0 = time.perf_counter()
            # DDP averages over data-parallel ranks: x dp_size turns that into the sum over ranks.
            sums = self._run_schedule(micro_batches, dp_size / max(num_targets, 1), False)
            self.sync()
            t1 = time.perf_counter()
            self.optimizer.prepare_grads()
            grad_norm = self._grad_norm()
            lr = self.lr
            if math.isfinite(grad_norm):
                max_norm = self.args.max_grad_norm
                if max_norm > 0:
                    for opt in _optimizers(self.optimizer):
                        clip_grad_by_total_norm_fp32(opt.get_parameters(), max_norm, grad_norm)
                self.optimizer.step_with_ready_grads()
            else:
                self.skipped_steps += 1  # a non-finite gradient never reaches the weights
            self.step += 1
            self._set_lr()
            self.sync()
        return StepStats(
            loss_sum=sums.loss_sum,
            targets=sums.targets,
            grad_norm=grad_norm,
            lr=lr,
            skipped_steps=self.skipped_steps,
            time_fwd_bwd=t1 - t0,
            time_optimizer=time.perf_counter() - t1,
            time_comm=None,  # megatron runs its collectives internally
        )

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
    def eval_step(self, micro_batches: list[MicroBatch]) -> EvalSums:
        with in_megatron():
            for c in self.chunks:
                c.eval()
            return self._run_schedule(micro_batches, None, True)

    # -- export ----------------------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return mmodel.gather_hf_state(self.modules, self.shape, self.ctx.rank)

    def save_hf(self, out_dir: Path, tokenizer: PreTrainedTokenizerBase, final: bool = False) -> None:
        with in_megatron():
            state = self.full_state_dict()
        if not self.ctx.is_main:
            return
        from sft_core.model.load import save_hf_folder

        save_hf_folder(self.hf_config, self.model_dir, state, out_dir)
        tokenizer.save_pretrained(out_dir)

    # -- exact resume ----------------------------------------------------------------------------------------
    def save_state(self, out_dir: Path) -> None:
        """This rank's shards as megatron holds them: model chunks, optimizer (the distributed
        optimizer's shard of Adam state), step, RNG. Resume needs the same layout; a new layout
        starts from the checkpoint's HF folder instead."""
        from megatron.core import tensor_parallel

        out_dir.mkdir(parents=True, exist_ok=True)
        self.save_rank_state(
            out_dir / f"megatron_rank{self.ctx.rank}.pt",
            rng_extra={"tracker": tensor_parallel.get_cuda_rng_tracker().get_states()},
            model=[c.state_dict() for c in self.modules],
            optimizer=[o.optimizer.state_dict() for o in _optimizers(self.optimizer)],
            step=self.step,
            layout=self.state_layout(self.cfg),
        )

    def load_state(self, state_dir: Path, hf_dir: Path) -> None:
        from megatron.core import tensor_parallel

        path = state_dir / f"megatron_rank{self.ctx.rank}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no megatron state for rank {self.ctx.rank} (was the layout changed?)"
            )
        own = self.read_rank_state(path)
        # Checked by the flow before any worker starts (check_same_layout); this is the backstop
        # for checkpoints saved before trainer_state.json recorded the layout.
        saved = {k: v for k, v in own["layout"].items() if not k.startswith("recompute_")}
        if saved != (layout := self.state_layout(self.cfg)):
            raise ValueError(
                f"{path}: saved with megatron layout {saved}, this run uses {layout}. "
                "Exact resume needs the same layout; start a new run from the checkpoint's HF folder instead."
            )
        with in_megatron():
            for chunk, sd in zip(self.modules, own["model"], strict=True):
                chunk.load_state_dict(sd)
            for opt, sd in zip(_optimizers(self.optimizer), own["optimizer"], strict=True):
                opt.optimizer.load_state_dict(sd)
                opt.reload_model_params()
        self.step = own["step"]
        self._set_lr()
        self.restore_rank_state(own)
        tensor_parallel.get_cuda_rng_tracker().set_states(own["rng"]["tracker"])

    def num_parameters(self) -> int:
        return self.num_params


def _import_megatron() -> None:
    """Import the megatron-core modules a run uses, then point them at the CPU shim (which patches
    loaded modules only; a no-op with CUDA)."""
    import megatron.core.distributed
    import megatron.core.models.gpt
    import megatron.core.optimizer
    import megatron.core.parallel_state
    import megatron.core.pipeline_parallel
    import megatron.core.tensor_parallel  # noqa: F401

    shim.install()


def _optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))
