"""How the workers find each other: rank 0's address, and joining torch.distributed."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from sft_core.strategies.base import DistContext


def free_port() -> int:
    """A port nothing on this node uses now (rank 0 offers it as the master port)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def join(
    rank: int,
    world_size: int,
    master: tuple[str, int],
    timeout_s: float,
    needs_group: bool,
    store_path: str | None = None,
) -> DistContext:
    """Pick this worker's device and, where `needs_group`, join the process group: nccl on GPU,
    gloo on CPU. With `store_path` (every worker on this machine's loopback) the rendezvous is a
    file and gloo talks over `lo`: torch's TCP store would listen on every interface, whatever
    MASTER_ADDR says. Collectives get `timeout_s`, so a frozen peer fails them instead of hanging."""
    use_gpu = torch.cuda.is_available()
    os.environ.update(
        MASTER_ADDR=master[0],
        MASTER_PORT=str(master[1]),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK="0",
    )
    if use_gpu:
        device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if needs_group:
        store = None
        if store_path:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "nccl" if use_gpu else "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return DistContext(rank, world_size, device)


def barrier() -> None:
    """Wait for every rank (no-op for a single worker that needs no process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
