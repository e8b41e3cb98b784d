"""`ddp_train`: torch DistributedDataParallel, gloo on CPU and nccl on GPU."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sft_core.strategies.torch_native import TorchStrategy


class DDPStrategy(TorchStrategy):
    name = "ddp_train"

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.ctx.world_size == 1:
            return model
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        # DDP broadcasts rank 0's weights when it wraps them: 2.6 s for SmolLM2-135M over gloo on
        # this project's CPU. Every rank loaded the same files, so only where they disagree (weights
        # a checkpoint lacked, initialized at random per rank) is that copy needed.
        ddp = DDP(model, device_ids=device_ids, init_sync=not replicas_agree(model))
        self._comm: dict[str, float] = {}
        ddp.register_comm_hook(self._comm, _timed_allreduce)
        return ddp

    def _take_comm_time(self) -> float | None:
        comm = self.__dict__.get("_comm")  # set only when wrapped in DDP (world_size > 1)
        if not comm or "first_start" not in comm:
            return 0.0 if comm is not None else None
        window = comm["last_end"] - comm["first_start"]
        comm.clear()
        return window

    def _hold_grad_sync(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if isinstance(self.model, DDP) else contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}


# No annotations on bucket / return: DDP checks them against dist.GradBucket / Future at runtime,
# and `from __future__ import annotations` would turn them into strings that fail that check.
def _timed_allreduce(state: dict[str, float], bucket):  # noqa: ANN001, ANN202
    """DDP's default gradient averaging (all-reduce of each bucket / world size), recording when the
    first bucket was launched and the last one finished. Buckets run concurrently with each other
    and with the backward pass, so the window between the two is the time communication was in
    flight, not time it added to the step."""
    now = time.perf_counter()
    state["first_start"] = min(state.get("first_start", now), now)
    tensor = bucket.buffer().div_(dist.get_world_size())
    future = dist.all_reduce(tensor, async_op=True).get_future()

    def done(f: torch.futures.Future) -> torch.Tensor:
        state["last_end"] = max(state.get("last_end", 0.0), time.perf_counter())
        return f.value()[0]

    return future.then(done)


@torch.no_grad()
def replicas_agree(model: torch.nn.Module) -> bool:
    """Whether every rank holds the same parameters and buffers, by a fingerprint of each tensor
    (sum and sum of squares in float64; equal only if equal on every rank). Any NaN reads as a
    disagreement, so the caller copies rank 0's state: the safe side."""
    tensors = [*model.parameters(), *model.buffers()]
    local = torch.stack([t.double().sum() for t in tensors] + [t.double().square().sum() for t in tensors])
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))
