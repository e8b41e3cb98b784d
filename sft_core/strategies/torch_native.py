"""The training step shared by the torch-native strategies (ddp_train, fsdp2_train).

Subclasses only say how the model is wrapped, how gradient sync is held back during accumulation,
and how a full state dict is gathered; the step itself is here, in plain sight.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sft_core.config import SFTConfig
from sft_core.data import IGNORE_INDEX
from sft_core.data.collate import MicroBatch
from sft_core.model import lora
from sft_core.model.load import DTYPES, count_parameters, load_causal_lm
from sft_core.strategies.base import DistContext, Strategy
from sft_core.strategies.precision import autocast_dtype
from sft_core.train.loss import next_token_targets, summed_token_loss, token_loss_sum
from sft_core.train.schedule import build_scheduler, follow_schedule
from sft_core.train.stats import EvalSums, StepStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A skipped (non-finite) step still advances the schedule, which torch then warns about.
_SCHEDULER_WARNING = re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`")


class TorchStrategy(Strategy):
    def __init__(self, cfg: SFTConfig, ctx: DistContext):
        super().__init__(cfg, ctx)
        # Weights stay fp32 (the optimizer's master copy); bf16/fp16 is autocast, on CPU where the
        # CPU multiplies bf16 natively (precision.py).
        self.autocast_dtype = autocast_dtype(DTYPES[cfg.sft_train.model_args.dtype], ctx.device)
        self.lora = cfg.sft_train.model_args.lora

    # -- what subclasses provide -------------------------------------------------------------
    @classmethod
    def preflight(cls, cfg: SFTConfig, model_dir: str) -> None:
        if cfg.sft_train.model_args.lora:
            lora.check_targets(cfg.sft_train.model_args.lora, model_dir)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def _hold_grad_sync(self) -> contextlib.AbstractContextManager:
        """Context for a micro-batch whose gradients must not be reduced yet (accumulation)."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) weights on CPU; a collective call where weights are sharded."""
        raise NotImplementedError

    def _take_comm_time(self) -> float | None:
        """Seconds spent in gradient collectives this step (overlapping backward); None where the
        strategy cannot measure it (FSDP2 issues its collectives internally)."""
        return None

    # -- setup -----------------------------------------------------------------------------------
    def initialize(self, model_dir: Path, total_steps: int) -> None:
        self.model_dir = model_dir
        base = load_causal_lm(model_dir, torch.float32, self.cfg.sft_train.model_args.attn_implementation)
        if self.args.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model: torch.nn.Module = lora.apply_lora(base, self.lora) if self.lora else base
        model.to(self.ctx.device)
        self.logits_at_targets_only = projects_selected_positions(base)  # a probe: before compiling
        self.loss_sum = token_loss_sum
        if self.cfg.sft_train.model_args.compile:
            compile_layers(model)
            # Fused: the fp32 upcast, log-softmax and its gradient never stored as [targets, vocab]
            # tensors. Dynamic: the count of targets changes every micro-batch.
            self.loss_sum = torch.compile(token_loss_sum, dynamic=True)
        self.module = model
        self.num_params = count_parameters(model)  # before sharding: the full model's size
        self.model = self._wrap(model)
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, p in self.model.named_parameters():
            if p.requires_grad:  # with LoRA only the adapter trains
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.args.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            total_steps,
            self.args.warmup_steps,
            self.args.warmup_ratio,
            self.args.lr_scheduler_type,
            self.args.min_lr_ratio,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def _summed_loss(self, mb: MicroBatch) -> tuple[torch.Tensor, int]:
        """Summed next-token loss of a micro-batch, and its count of supervised targets.

        Only the positions that have a target go through the LM head (transformers' boolean
        `logits_to_keep`): the others' logits would get zero gradient anyway, and on a 135M model
        with a 49k vocabulary the head is a fifth of the FLOPs and the [T, V] logits most of the
        activation memory. The loss is the same sum over the same positions."""
        targets = next_token_targets(mb.labels)
        with self._autocast():
            if self.logits_at_targets_only:
                keep = targets != IGNORE_INDEX
                out = self.model(input_ids=mb.input_ids, position_ids=mb.position_ids, logits_to_keep=keep)
                targets = targets[keep]
            else:
                out = self.model(input_ids=mb.input_ids, position_ids=mb.position_ids)
        return summed_token_loss(out.logits, targets, self.loss_sum)

    # -- the step ---------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[MicroBatch], num_targets: int) -> StepStats:
        self.model.train()
        batches = micro_batches  # the worker gives every rank the same count (padding with masked ones)
        # Gradients are averaged over ranks by DDP / FSDP; multiplying by world_size turns that into
        # the sum of every rank's sum_tokens(CE) / num_targets: the per-token mean of the whole step.
        scale = self.ctx.world_size / max(num_targets, 1)
        loss_sum, targets = 0.0, 0
        t0 = time.perf_counter()
        for i, mb in enumerate(batches):
            mb = mb.to(self.ctx.device)
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self._hold_grad_sync():
                loss, n = self._summed_loss(mb)
                (loss * scale).backward()
            loss_sum += float(loss.detach())
            targets += n
        self.sync()
        t1 = time.perf_counter()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = grad_norm_fp64(grads)
        lr = float(self.scheduler.get_last_lr()[0])
        if math.isfinite(grad_norm):
            clip_(grads, self.args.max_grad_norm, grad_norm)
            self.optimizer.step()
        else:
            self.skipped_steps += 1  # a non-finite gradient never reaches the weights
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped step still advances the schedule: lr stays a function of the global step.
            warnings.filterwarnings("ignore", message=_SCHEDULER_WARNING)
            self.scheduler.step()
        self.sync()
        return StepStats(
            loss_sum=loss_sum,
            targets=targets,
            grad_norm=grad_norm,
            lr=lr,
            skipped_steps=self.skipped_steps,
            time_fwd_bwd=t1 - t0,
            time_optimizer=time.perf_counter() - t1,
            time_comm=self._take_comm_time(),
        )

    @torch.no_grad()
    def eval_step(self, micro_batches: list[MicroBatch]) -> EvalSums:
        self.model.eval()
        loss_sum, targets = 0.0, 0
        for mb in micro_batches:
            loss, n = self._summed_loss(mb.to(self.ctx.device))
            loss_sum += float(loss)
            targets += n
        return EvalSums(loss_sum, targets)

    # -- export and exact resume -------------------------------------------------------------------
    def save_hf(self, out_dir: Path, tokenizer: PreTrainedTokenizerBase, final: bool = False) -> None:
        """A Hugging Face folder; with LoRA the adapter folder, and at the end (merge_at_end) the
        merged model in `<out_dir>-merged` beside it."""
        state = self.full_state_dict()
        if not self.ctx.is_main:
            return
        if self.lora:
            from peft import PeftModel

            assert isinstance(self.module, PeftModel), "LoRA runs wrap the model in peft"
            lora.save_adapter(self.module, state, out_dir)
            tokenizer.save_pretrained(out_dir)
            if final and self.lora.merge_at_end:
                merged = out_dir.with_name(out_dir.name + "-merged")
                lora.save_merged(self.model_dir, self.lora, state, merged, torch.float32)
                tokenizer.save_pretrained(merged)
            return
        from transformers import PreTrainedModel

        assert isinstance(self.module, PreTrainedModel), "full fine-tuning trains the loaded model itself"
        config = self.module.config
        config.use_cache = True  # the exported model generates with its KV cache
        try:
            self.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        finally:
            config.use_cache = False
        tokenizer.save_pretrained(out_dir)

    def save_state(self, out_dir: Path) -> None:
        """Optimizer (torch.distributed.checkpoint, sharding-aware), scheduler, RNG of this rank; the
        weights too only with LoRA (the adapter). A full model's weights are not written twice: the
        Hugging Face folder of the same checkpoint holds them in fp32, which is exact (a quarter of
        the checkpoint's bytes: weights + Adam's two moments were written here before)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = self._trainable(
            get_state_dict(self.model, self.optimizer, options=self._state_options())
        )
        weights = "dcp" if self.lora else "hf"
        state = {"model": model_sd, "optim": optim_sd} if weights == "dcp" else {"optim": optim_sd}
        dcp.save(state, checkpoint_id=str(out_dir / "dcp"))
        self.save_rank_state(
            out_dir / f"rank{self.ctx.rank}.pt", scheduler=self.scheduler.state_dict(), weights=weights
        )

    def load_state(self, state_dir: Path, hf_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from sft_core.train.dcp_metadata import SafeFileSystemReader

        own = self.read_rank_state(state_dir / f"rank{self.ctx.rank}.pt")
        model_sd, optim_sd = self._trainable(
            get_state_dict(self.model, self.optimizer, options=self._state_options())
        )
        # Checkpoints written before the weights moved out of the resume state have "model" in it.
        in_hf = own.get("weights") == "hf"
        state = {"optim": optim_sd} if in_hf else {"model": model_sd, "optim": optim_sd}
        # The index is unpickled through an allowlist: a checkpoint folder is data, never code.
        dcp.load(state, storage_reader=SafeFileSystemReader(state_dir / "dcp"))
        if in_hf:
            # Every rank reads the full weights; set_model_state_dict shards them where FSDP2 does.
            full = _hf_weights(hf_dir)
            set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True))
        else:
            set_model_state_dict(self.model, state["model"], options=self._state_options())
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=self._state_options())
        self.scheduler.load_state_dict(own["scheduler"])
        follow_schedule(self.scheduler)  # this run's schedule, also where max_steps changed
        self.restore_rank_state(own)

    def _state_options(self) -> Any:
        """Frozen weights (a LoRA run's base model) come from the pretrained folder on resume."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, strict=not self.lora)

    def _trainable(
        self, state: tuple[dict[str, Any], dict[str, Any]]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Drop what ignore_frozen_params lets through under another name (a tied, frozen LM head)."""
        model_sd, optim_sd = state
        if self.lora:
            trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
            model_sd = {k: v for k, v in model_sd.items() if k in trainable}
        return model_sd, optim_sd

    def num_parameters(self) -> int:
        return self.num_params


def _hf_weights(hf_dir: Path) -> dict[str, Any]:
    """The fp32 weights of a checkpoint's Hugging Face folder, under the model's own parameter
    names: loaded through from_pretrained, so that any key renaming transformers does on save is
    undone the same way it is for users."""
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{hf_dir}: the resume state beside it keeps its weights in this Hugging Face folder, "
            "which is missing or incomplete"
        )
    return load_causal_lm(hf_dir, torch.float32).state_dict()


@torch.no_grad()
def projects_selected_positions(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes a boolean [B, T] `logits_to_keep` and returns logits for
    just those positions, flattened to [K, V] (transformers' slice_logits_to_keep). Model code
    written before that indexes with the mask wrongly or raises, so it is probed once, in eval mode
    (no dropout, no RNG drawn)."""
    import inspect

    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return False
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keep = torch.tensor([[False, True, False, True]], device=device)
    try:
        logits = model(
            input_ids=torch.zeros(1, 4, dtype=torch.long, device=device), logits_to_keep=keep
        ).logits
    except (IndexError, RuntimeError, TypeError, ValueError):
        return False
    finally:
        model.train(was_training)
    return logits.dim() == 2 and logits.size(0) == 2


@torch.no_grad()
def grad_norm_fp64(grads: list[torch.Tensor]) -> float:
    """Global L2 norm of the gradient, accumulated in float64 (sharded DTensor gradients are
    reduced over their mesh). torch's clip_grad_norm_ sums in float32, ~4e-5 (relative) off on a
    small model, and differently for each sharding; this is the norm every strategy reports."""
    if not grads:
        return 0.0
    squares = sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads)
    if hasattr(squares, "full_tensor"):
        squares = squares.full_tensor()
    return float(squares) ** 0.5


@torch.no_grad()
def clip_(grads: list[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """Scale gradients so their norm is at most max_norm (0 disables), as torch and megatron do."""
    coef = max_norm / (total_norm + 1e-6)
    if max_norm > 0 and coef < 1.0:
        for g in grads:
            g.mul_(coef)


def decoder_layers(model: torch.nn.Module, who: str) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (inside a peft wrapper too)."""
    layers = getattr(getattr(lora.base_model(model), "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{who}: cannot find decoder layers (model.model.layers) in {type(model).__name__}")
    return list(layers)


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (parameter names and the state dict unchanged). The
    layers run the same code with their parameters as graph inputs, so they share one compiled graph
    per mode (train, eval): compile time is about one layer's. The embedding and the LM head stay
    eager: how many positions have a target changes their shapes every micro-batch."""
    from sft_core.home import inductor_cache

    try:  # a private module of torch's: where it moved, only an unset variable counts as unset
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default: str | None = default_cache_dir()
    except ImportError:
        torch_default = None
    # Unless the user chose a cache (torch writes its default into the variable when it first looks).
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, torch_default):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache())  # Triton's cache goes inside it
    for layer in decoder_layers(model, "sft_train.model_args.compile"):
        layer.compile(dynamic=True)
