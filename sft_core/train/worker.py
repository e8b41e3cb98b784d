"""SFTWorker: one training process (one entry of device_mapping). The Cluster runs it as a Ray actor.

Every worker loads the same encoded data and packing plan and derives its own micro-batches from the
shared BatchSchedule, so the driver only says "step k": no batch data crosses Ray.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from sft_core.config import SFTConfig
from sft_core.data import IGNORE_INDEX
from sft_core.data.collate import MicroBatch, collate_rows, masked_batch
from sft_core.data.packing import PackedPlan
from sft_core.data.store import EncodedData
from sft_core.model.load import DTYPES
from sft_core.model.resolve import load_tokenizer, sft_home
from sft_core.strategies import DistContext, create_strategy
from sft_core.strategies.precision import compute_dtype
from sft_core.train import mfu
from sft_core.train.batching import BatchSchedule, split_for_rank


def row_targets(data: EncodedData, plan: PackedPlan) -> np.ndarray:
    """Supervised targets per packed row (each sample's first token is never a target)."""
    mask = data.labels != IGNORE_INDEX
    mask[data.offsets[:-1]] = False
    per_sample = np.add.reduceat(mask.astype(np.int64), data.offsets[:-1])
    return np.array([int(per_sample[r].sum()) for r in plan.rows], dtype=np.int64)


class SFTWorker:
    def __init__(self, cfg: dict[str, Any], rank: int, world_size: int, artifacts: dict[str, Any]):
        self.cfg = SFTConfig.model_validate(cfg)
        self.rank, self.world_size = rank, world_size
        self.artifacts = artifacts  # model_dir, train/val encoded paths and plans

    # -- rendezvous ---------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """(ip, free port) of this node, used by rank 0 as the torch.distributed master."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup_distributed(self, master_addr: str, master_port: int, store_path: str | None = None) -> None:
        """Join the process group. With `store_path` (every worker on this machine's loopback) the
        rendezvous is a file and gloo talks over `lo`: torch's TCP store would listen on every
        interface, whatever MASTER_ADDR says."""
        use_gpu = torch.cuda.is_available()
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        if use_gpu:
            device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
        # megatron's parallel state needs a process group even for one worker.
        if self.world_size > 1 or self.cfg.sft_train.strategy_args.strategy_name == "megatron_train":
            store = None
            if store_path:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
                store = dist.FileStore(store_path, self.world_size)
            # Collectives share the driver's bound: a frozen peer fails them instead of hanging 30 min.
            dist.init_process_group(
                "nccl" if use_gpu else "gloo",
                store=store,
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=self.cfg.sft_train.worker_timeout_s),
            )
        self.ctx = DistContext(self.rank, self.world_size, device)

    def node(self) -> dict[str, Any]:
        """Where this worker runs (Ray node id and address)."""
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address()}

    def check_storage(self, paths: list[str], probe_dir: str | None) -> None:
        """The driver's files must be readable here, and a probe written here visible to the driver."""
        node = ray.util.get_node_ip_address()
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(
                    f"rank {self.rank} on node {node} cannot read {p}: the data cache (SFT_HOME) must be "
                    "on storage every node shares"
                )
        if probe_dir:
            (Path(probe_dir) / f".probe-rank{self.rank}").write_text(node)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        """Answered from a second actor thread while a long call runs: proves the process is alive."""
        return self.rank

    # -- SFTWorker API (as in the seed) ------------------------------------------------------
    def initialize(self, resume_dir: str | None = None) -> dict[str, Any]:
        """Create the strategy, load the model and data; with `resume_dir`, restore the exact state
        saved there (weights, optimizer, scheduler, this rank's RNG)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # The MFU denominator first, before anything loads: on CPU one worker per machine times the
        # matmul peak (once, cached) while the others wait at the lock, then at the barrier.
        dtype = compute_dtype(DTYPES[self.cfg.sft_train.model_args.dtype], self.ctx.device)
        self.peak_flops, self.peak_source = mfu.peak_flops(
            self.ctx.device, dtype, sft_home(), self.cfg.sft_train.peak_tflops
        )
        if dist.is_initialized():
            dist.barrier()
        a = self.artifacts
        self.train_data = EncodedData.load(a["train_encoded"])
        self.train_plan = PackedPlan.from_dict(json.loads(Path(a["train_plan"]).read_text()))
        self.train_row_targets = row_targets(self.train_data, self.train_plan)
        self.train_row_squares = mfu.row_square_lengths(self.train_data.offsets, self.train_plan.rows)
        self.val_data = EncodedData.load(a["val_encoded"]) if a.get("val_encoded") else None
        self.val_plan = (
            PackedPlan.from_dict(json.loads(Path(a["val_plan"]).read_text())) if a.get("val_plan") else None
        )
        self.tokenizer = load_tokenizer(a["tokenizer_dir"])
        self.pad_id = int(self.tokenizer.pad_token_id)
        t = self.cfg.sft_train.training_args
        self.schedule = BatchSchedule(len(self.train_plan.rows), self.cfg.global_batch_size, self.cfg.seed)
        self.total_steps = self.schedule.total_steps(t.num_train_epochs, t.max_steps)
        torch.manual_seed(self.cfg.seed)
        self.strategy = create_strategy(self.cfg, self.ctx)
        self.strategy.initialize(Path(a["model_dir"]), self.total_steps)
        if resume_dir:
            self.strategy.load_state(Path(resume_dir))
        from transformers import AutoConfig

        self.shape = mfu.ModelShape.from_hf_config(
            AutoConfig.from_pretrained(a["model_dir"]),
            self.strategy.num_parameters(),
            lora=self.cfg.sft_train.model_args.lora is not None,
        )
        return {
            "rank": self.rank,
            "device": str(self.ctx.device),
            "parameters": self.strategy.num_parameters(),
            "total_steps": self.total_steps,
            "steps_per_epoch": self.schedule.steps_per_epoch,
            "train_rows": len(self.train_plan.rows),
            "peak_flops": self.peak_flops,
            "peak_source": self.peak_source,
        }

    def train_step(self, step: int) -> dict[str, float]:
        """Optimizer step `step` (0-based) over this rank's share of the global batch."""
        t0 = time.perf_counter()
        rows = self.schedule.global_batch(step)
        num_targets = int(self.train_row_targets[rows].sum())
        size = self.cfg.sft_train.training_args.per_device_train_batch_size
        micro = self._my_micro_batches(self.train_data, self.train_plan, rows, size)
        t1 = time.perf_counter()
        out = self.strategy.train_step(micro, num_targets)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        # Counted once per model replica (tensor/pipeline parallel ranks share their replica's batch).
        counted = self.strategy.reports_metrics
        tokens = sum(mb.num_tokens for mb in micro) if counted else 0
        real = sum(mb.real_tokens for mb in micro) if counted else 0
        dp_rank, dp_size = self.strategy.data_parallel
        mine = [r for ids in split_for_rank(rows, dp_rank, dp_size, size) for r in ids]
        squares = int(self.train_row_squares[mine].sum()) if counted else 0
        flops = mfu.training_flops(self.shape, real, squares)
        out.update(
            num_targets=num_targets,
            tokens=tokens,
            real_tokens=real,
            time_data=t1 - t0,
            time_step=t2 - t0,
            flops=flops,
            peak_flops=self.peak_flops,
            mfu=mfu.mfu(flops, t2 - t0, self.peak_flops),
            epoch=self.schedule.epoch_of(step),
            peak_memory_mb=_peak_memory_mb(self.ctx.device),
            rank=self.rank,
        )
        return out

    def val_step(self) -> dict[str, float]:
        """Loss sums over this rank's share of every validation row (no row dropped)."""
        if self.val_data is None or self.val_plan is None:
            return {"loss_sum": 0.0, "targets": 0}
        rows = list(range(len(self.val_plan.rows)))
        micro = self._my_micro_batches(
            self.val_data, self.val_plan, rows, self.cfg.sft_train.infer_batch_size
        )
        loss_sum, targets = self.strategy.eval_step(micro)
        return {"loss_sum": loss_sum, "targets": targets}

    def _my_micro_batches(
        self, data: EncodedData, plan: PackedPlan, rows: list[int], size: int
    ) -> list[MicroBatch]:
        """This model replica's share of `rows`, cut into micro-batches. Every rank runs rank 0's
        count (the largest) so collective calls line up; the masked extras add nothing to loss or
        gradient."""
        dp_rank, dp_size = self.strategy.data_parallel
        micro = [
            collate_rows(data, plan, ids, self.pad_id) for ids in split_for_rank(rows, dp_rank, dp_size, size)
        ]
        count = len(split_for_rank(rows, 0, dp_size, size))
        return micro + [masked_batch() for _ in range(count - len(micro))]

    def do_checkpoint(self, staged_dir: str, final: bool = False) -> dict[str, float]:
        """Write `<staged>/<cluster name>/` (Hugging Face folder) and `<staged>/train_state/` (exact
        resume: sharded model + optimizer, scheduler, every rank's RNG). The driver publishes it."""
        t = time.perf_counter()
        root = Path(staged_dir)
        if self.ctx.is_main:
            root.mkdir(parents=True, exist_ok=True)
        if self.world_size > 1:
            dist.barrier()
        self.strategy.save_hf(root / self.cfg.sft_train.name, self.tokenizer, final)
        self.strategy.save_state(root / "train_state")
        if self.world_size > 1:
            dist.barrier()
        return {"time": time.perf_counter() - t}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU (for tests and tools); collective: call it on every rank."""
        return {k: v.clone() for k, v in self.strategy.full_state_dict().items()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
