"""SFTWorker: one training process (one entry of device_mapping): data, strategy and step
accounting. The Cluster runs it as a Ray actor (actor.py adds the Ray and rendezvous parts).

Every worker loads the same encoded data and packing plan and derives its own micro-batches from the
shared BatchSchedule, so the driver only says "step k": no batch data crosses Ray.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sft_core.cluster.rendezvous import barrier
from sft_core.config import SFTConfig
from sft_core.data import IGNORE_INDEX
from sft_core.data.collate import MicroBatch, collate_rows, masked_batch
from sft_core.data.packing import PackedPlan
from sft_core.data.store import EncodedData
from sft_core.data.templates import carry_template, end_of_turn_id, get_template
from sft_core.home import sft_home
from sft_core.model.resolve import load_tokenizer
from sft_core.model.stop_tokens import stop_at
from sft_core.secrets import is_secret_env
from sft_core.strategies.base import DistContext
from sft_core.strategies.registry import create_strategy, strategy_for
from sft_core.train import mfu
from sft_core.train.artifacts import TrainArtifacts
from sft_core.train.batching import BatchSchedule, split_for_rank
from sft_core.train.host_memory import keeps_freed_memory
from sft_core.train.stats import EvalSums, RankStep


def row_targets(data: EncodedData, plan: PackedPlan) -> np.ndarray:
    """Supervised targets per packed row (each sample's first token is never a target)."""
    mask = data.labels != IGNORE_INDEX
    mask[data.offsets[:-1]] = False
    per_sample = np.add.reduceat(mask.astype(np.int64), data.offsets[:-1])
    return np.array([int(per_sample[r].sum()) for r in plan.rows], dtype=np.int64)


@dataclass(frozen=True)
class WorkerInfo:
    """What `initialize` reports: the run's size as this rank computed it."""

    rank: int
    device: str
    parameters: int  # of the whole model (not this rank's shard)
    total_steps: int
    steps_per_epoch: int
    train_rows: int
    peak_flops: float
    peak_source: str
    keeps_host_memory: bool  # started with KEEP_FREED_MEMORY_ENV (sft_train.keep_host_memory)
    niceness: int  # the process's scheduling niceness (Ray's workers: 15 unless told otherwise)


class SFTWorker:
    """The seed's worker API. `ctx` (rank, world size, device) is set by the rendezvous
    (cluster/rendezvous.py) before `initialize`."""

    ctx: DistContext

    artifacts: TrainArtifacts

    def __init__(self, cfg: dict[str, Any], rank: int, world_size: int):
        self.cfg = SFTConfig.model_validate(cfg)
        self.rank, self.world_size = rank, world_size
        # The secret-named system_envs, which the cluster kept out of Ray's runtime_env (and its logs).
        os.environ.update({k: v for k, v in self.cfg.system_envs.items() if is_secret_env(k)})
        # What `initialize` needs, imported now: the flow starts the workers before the run's data
        # is ready, so that these seconds overlap its data and MLflow work.
        strategy_for(self.cfg)
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    def use_artifacts(self, artifacts: TrainArtifacts) -> None:
        """The run's data, tokenizer and model files (ready once the driver has prepared them)."""
        self.artifacts = artifacts

    # -- SFTWorker API (as in the seed) ------------------------------------------------------
    def initialize(self, resume_dir: str | None = None) -> WorkerInfo:
        """Create the strategy, load the model and data; with `resume_dir`, restore the exact state
        saved there (weights, optimizer, scheduler, this rank's RNG)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # The MFU denominator first, before anything loads: on CPU one worker per machine times the
        # matmul peak (once, cached) while the others wait at the lock, then at the barrier.
        dtype = strategy_for(self.cfg).compute_dtype(self.cfg, self.ctx.device)
        self.peak_flops, self.peak_source = mfu.peak_flops(
            self.ctx.device, dtype, sft_home(), self.cfg.sft_train.peak_tflops
        )
        barrier()
        a = self.artifacts
        self.train_data = EncodedData.load(a.train.encoded)
        self.train_plan = _load_plan(a.train.plan)
        self.train_row_targets = row_targets(self.train_data, self.train_plan)
        self.train_row_squares = mfu.row_square_lengths(self.train_data.offsets, self.train_plan.rows)
        self.val_data = EncodedData.load(a.validation.encoded) if a.validation else None
        self.val_plan = _load_plan(a.validation.plan) if a.validation else None
        self.tokenizer = load_tokenizer(a.tokenizer_dir)
        carry_template(  # saved with every checkpoint
            self.cfg.template_for("train"), self.tokenizer, self.cfg.sft_train.data_args.supervise_empty_think
        )
        self.end_of_turn_id = end_of_turn_id(
            get_template(self.cfg.template_for("train"), self.tokenizer), self.tokenizer
        )
        self.pad_id = int(self.tokenizer.pad_token_id)
        t = self.cfg.sft_train.training_args
        self.schedule = BatchSchedule(len(self.train_plan.rows), self.cfg.global_batch_size, self.cfg.seed)
        self.total_steps = self.schedule.total_steps(t.num_train_epochs, t.max_steps)
        torch.manual_seed(self.cfg.seed)
        self.strategy = create_strategy(self.cfg, self.ctx)
        self.strategy.initialize(Path(a.model_dir), self.total_steps)
        if resume_dir:
            self.strategy.load_state(Path(resume_dir), Path(resume_dir).parent / self.cfg.sft_train.name)
        from transformers import AutoConfig

        self.shape = mfu.ModelShape.from_hf_config(
            AutoConfig.from_pretrained(a.model_dir),
            self.strategy.num_parameters(),
            lora=self.cfg.sft_train.model_args.lora is not None,
        )
        return WorkerInfo(
            rank=self.rank,
            device=str(self.ctx.device),
            parameters=self.strategy.num_parameters(),
            total_steps=self.total_steps,
            steps_per_epoch=self.schedule.steps_per_epoch,
            train_rows=len(self.train_plan.rows),
            peak_flops=self.peak_flops,
            peak_source=self.peak_source,
            keeps_host_memory=keeps_freed_memory(),
            niceness=os.getpriority(os.PRIO_PROCESS, 0),
        )

    def train_step(self, step: int) -> RankStep:
        """Optimizer step `step` (0-based) over this rank's share of the global batch."""
        t0 = time.perf_counter()
        rows = self.schedule.global_batch(step)
        num_targets = int(self.train_row_targets[rows].sum())
        size = self.cfg.sft_train.training_args.per_device_train_batch_size
        micro = self._my_micro_batches(self.train_data, self.train_plan, rows, size)
        t1 = time.perf_counter()
        stats = self.strategy.train_step(micro, num_targets)
        self.strategy.sync()
        t2 = time.perf_counter()
        # Counted once per model replica (tensor/pipeline parallel ranks share their replica's batch).
        counted = self.strategy.reports_metrics
        tokens = sum(mb.num_tokens for mb in micro) if counted else 0
        real = sum(mb.real_tokens for mb in micro) if counted else 0
        dp_rank, dp_size = self.strategy.data_parallel
        mine = [r for ids in split_for_rank(rows, dp_rank, dp_size, size) for r in ids]
        squares = int(self.train_row_squares[mine].sum()) if counted else 0
        head = stats.targets if self.strategy.logits_at_targets_only else None
        flops = mfu.training_flops(self.shape, real, squares, head)
        return RankStep(
            rank=self.rank,
            stats=stats,
            num_targets=num_targets,
            tokens=tokens,
            real_tokens=real,
            flops=flops,
            peak_flops=self.peak_flops,
            time_data=t1 - t0,
            time_step=t2 - t0,
            epoch=self.schedule.epoch_of(step),
            peak_memory_mb=_peak_memory_mb(self.ctx.device),
        )

    def val_step(self) -> EvalSums:
        """Loss sums over this rank's share of every validation row (no row dropped)."""
        if self.val_data is None or self.val_plan is None:
            return EvalSums()
        rows = list(range(len(self.val_plan.rows)))
        micro = self._my_micro_batches(
            self.val_data, self.val_plan, rows, self.cfg.sft_train.infer_batch_size
        )
        return self.strategy.eval_step(micro)

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

    def do_checkpoint(self, staged_dir: str, final: bool = False) -> float:
        """Write `<staged>/<cluster name>/` (Hugging Face folder) and `<staged>/train_state/` (exact
        resume: sharded model + optimizer, scheduler, every rank's RNG). The driver publishes it.
        Returns the seconds it took."""
        t = time.perf_counter()
        root = Path(staged_dir)
        if self.ctx.is_main:
            root.mkdir(parents=True, exist_ok=True)
        barrier()
        hf_dir = root / self.cfg.sft_train.name
        self.strategy.save_hf(hf_dir, self.tokenizer, final)
        if self.ctx.is_main and self.end_of_turn_id is not None:  # the merged model of a LoRA run too
            for folder in (hf_dir, hf_dir.with_name(hf_dir.name + "-merged")):
                stop_at(folder, self.end_of_turn_id)
        self.strategy.save_state(root / "train_state")
        barrier()
        return time.perf_counter() - t

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU (for tests and tools); collective: call it on every rank."""
        return {k: v.clone() for k, v in self.strategy.full_state_dict().items()}


def _load_plan(path: str) -> PackedPlan:
    return PackedPlan.from_dict(json.loads(Path(path).read_text()))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
