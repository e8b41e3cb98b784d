"""`fsdp2_train`: torch FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded
over the data-parallel ranks. Works on CPU with gloo (torch 2.13) and on GPU with nccl."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from sft_core.strategies.torch_native import TorchStrategy, decoder_layers


class FSDP2Strategy(TorchStrategy):
    name = "fsdp2_train"

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not torch.distributed.is_initialized():
            return model  # one worker: nothing to shard
        mesh = init_device_mesh(self.ctx.device.type, (self.ctx.world_size,))
        # One FSDP unit per decoder layer (all-gathered just in time), then the rest (embeddings,
        # final norm, a tied LM head) as the root unit.
        for layer in decoder_layers(model, self.name):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    @contextlib.contextmanager
    def _hold_grad_sync(self) -> Iterator[None]:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(self.model, FSDPModule):  # one worker: not sharded
            yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not torch.distributed.is_initialized():
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        state = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
