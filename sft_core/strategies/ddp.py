"""`ddp_train`: torch DistributedDataParallel, gloo on CPU and nccl on GPU."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sft_core.strategies.torch_native import TorchStrategy


class DDPStrategy(TorchStrategy):
    name = "ddp_train"

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.ctx.world_size == 1:
            return model
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)

    def _hold_grad_sync(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if isinstance(self.model, DDP) else contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
