"""`ddp_train`: torch DistributedDataParallel, gloo on CPU and nccl on GPU."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sft_core.config import SFTConfig
from sft_core.data import IGNORE_INDEX
from sft_core.data.collate import MicroBatch
from sft_core.model.load import DTYPES, count_parameters, load_causal_lm
from sft_core.strategies.base import DistContext
from sft_core.train.loss import summed_token_loss
from sft_core.train.schedule import build_scheduler


class DDPStrategy:
    name = "ddp_train"

    def __init__(self, cfg: SFTConfig, ctx: DistContext):
        self.cfg = cfg
        self.ctx = ctx
        self.args = cfg.sft_train.training_args
        on_gpu = ctx.device.type == "cuda"
        requested = DTYPES[cfg.sft_train.model_args.dtype]
        # Weights stay fp32 (the optimizer's master copy); bf16/fp16 is autocast, on GPU only.
        self.autocast_dtype = requested if on_gpu and requested != torch.float32 else None
        self.skipped_steps = 0

    def initialize(self, model_dir: Path, total_steps: int) -> None:
        model = load_causal_lm(model_dir, torch.float32, self.cfg.sft_train.model_args.attn_implementation)
        if self.args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.ctx.device)
        self.module = model
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        self.model = DDP(model, device_ids=device_ids) if self.ctx.world_size > 1 else model
        decay, no_decay = [], []
        for name, p in model.named_parameters():
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

    def _dummy(self) -> MicroBatch:
        """A fully masked micro-batch for a rank with no rows in a short last batch: DDP still needs
        every rank to run one synchronised backward, and it contributes a zero gradient."""
        ids = torch.zeros((1, 2), dtype=torch.long)
        return MicroBatch(ids, torch.full_like(ids, IGNORE_INDEX), torch.arange(2).unsqueeze(0), 0)

    def train_step(self, micro_batches: list[MicroBatch], num_targets: int) -> dict[str, float]:
        self.model.train()
        batches = micro_batches or [self._dummy()]
        # DDP averages gradients over ranks; multiplying by world_size turns that into the sum of
        # every rank's sum_tokens(CE) / num_targets, the global per-token mean (sft_core.train.loss).
        scale = self.ctx.world_size / max(num_targets, 1)
        loss_sum, targets = 0.0, 0
        for i, mb in enumerate(batches):
            mb = mb.to(self.ctx.device)
            last = i == len(batches) - 1
            sync = (
                contextlib.nullcontext() if last or not isinstance(self.model, DDP) else self.model.no_sync()
            )
            with sync:
                with self._autocast():
                    logits = self.model(input_ids=mb.input_ids, position_ids=mb.position_ids).logits
                loss, n = summed_token_loss(logits, mb.labels)
                (loss * scale).backward()
            loss_sum += float(loss.detach())
            targets += n
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm))
        lr = self.scheduler.get_last_lr()[0]
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.skipped_steps += 1  # a non-finite gradient never reaches the weights
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {
            "loss_sum": loss_sum,
            "targets": targets,
            "grad_norm": grad_norm,
            "lr": lr,
            "skipped_steps": self.skipped_steps,
        }

    @torch.no_grad()
    def eval_step(self, micro_batches: list[MicroBatch]) -> tuple[float, int]:
        self.module.eval()
        loss_sum, targets = 0.0, 0
        for mb in micro_batches:
            mb = mb.to(self.ctx.device)
            with self._autocast():
                logits = self.module(input_ids=mb.input_ids, position_ids=mb.position_ids).logits
            loss, n = summed_token_loss(logits, mb.labels)
            loss_sum += float(loss)
            targets += n
        return loss_sum, targets

    def save_hf(self, out_dir: Path, tokenizer: Any) -> None:
        if not self.ctx.is_main:
            return
        config = self.module.config
        config.use_cache = True  # the exported model generates with its KV cache
        try:
            self.module.save_pretrained(out_dir, safe_serialization=True)
        finally:
            config.use_cache = False
        tokenizer.save_pretrained(out_dir)

    def num_parameters(self) -> int:
        return count_parameters(self.module)
