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
        ddp = DDP(model, device_ids=device_ids)
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
