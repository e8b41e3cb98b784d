"""The one interface every training strategy implements (the names are in registry.py).

A strategy owns the model's distribution: wrapping, the step over micro-batches, evaluation,
export and exact resume; and the decisions about itself that are made before workers start
(class methods: checks of the model against the layout, its line in the run log, whether a
process group is needed).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from sft_core.config import SFTConfig
from sft_core.data.collate import MicroBatch
from sft_core.train import rng
from sft_core.train.stats import EvalSums, StepStats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Strategy(abc.ABC):
    name: ClassVar[str]
    # Whether the LM head runs only at positions that have a target (else at every token): the
    # FLOP count of the step (train/mfu.py) follows it.
    logits_at_targets_only: bool = False
    # The format of the per-rank resume state: a checkpoint resumes only into a strategy of its format.
    state_format: ClassVar[str] = "dcp"

    def __init__(self, cfg: SFTConfig, ctx: DistContext):
        self.cfg = cfg
        self.ctx = ctx
        self.args = cfg.sft_train.training_args
        self.skipped_steps = 0  # non-finite steps, never applied to the weights

    # -- decided before any worker starts ------------------------------------------------------
    @classmethod
    def preflight(cls, cfg: SFTConfig, model_dir: str) -> None:
        """Stop (ConfigError / ModelError) when this model cannot run with this layout."""
        return None  # nothing to check for strategies that take any model the loader takes

    @classmethod
    def state_layout(cls, cfg: SFTConfig) -> dict[str, Any] | None:
        """What the per-rank resume state is sharded by, where a resume cannot reshard it (None: any
        layout resumes, as DCP reshards on load)."""
        return None

    @classmethod
    def describe(cls, cfg: SFTConfig) -> str:
        """The strategy and its layout, one line for the run log."""
        compiled = ", decoder layers and loss under torch.compile" if cfg.sft_train.model_args.compile else ""
        return f"{cls.name}: {cfg.sft_train.world_size} data-parallel worker(s){compiled}"

    @classmethod
    def compute_dtype(cls, cfg: SFTConfig, device: torch.device) -> torch.dtype:
        """The dtype this strategy's matmuls run in on `device` (the MFU peak is that dtype's)."""
        from sft_core.model.load import DTYPES
        from sft_core.strategies.precision import compute_dtype

        return compute_dtype(DTYPES[cfg.sft_train.model_args.dtype], device)

    @classmethod
    def needs_process_group(cls, world_size: int) -> bool:
        """Whether torch.distributed must be initialized for `world_size` workers."""
        return world_size > 1

    # -- the layout, as this rank sees it --------------------------------------------------------
    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) among model replicas: which share of each global batch this rank trains on.
        Every rank for ddp/fsdp2; ranks of one tensor/pipeline group share a replica's data."""
        return self.ctx.rank, self.ctx.world_size

    @property
    def reports_metrics(self) -> bool:
        """Whether this rank's loss and token counts are its replica's (exactly one rank per replica),
        so that summing over ranks counts each token once."""
        return True

    # -- the work ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def initialize(self, model_dir: Path, total_steps: int) -> None:
        """Load the model from a Hugging Face folder, wrap it, build optimizer and scheduler."""

    @abc.abstractmethod
    def train_step(self, micro_batches: list[MicroBatch], num_targets: int) -> StepStats:
        """One optimizer step. `num_targets` is the supervised-target count of the whole global batch."""

    @abc.abstractmethod
    def eval_step(self, micro_batches: list[MicroBatch]) -> EvalSums:
        """Summed loss and supervised targets over this rank's validation micro-batches."""

    @abc.abstractmethod
    def save_hf(self, out_dir: Path, tokenizer: PreTrainedTokenizerBase, final: bool = False) -> None:
        """Write a Hugging Face folder (rank 0 writes; every rank calls); `final` at the run's end."""

    @abc.abstractmethod
    def save_state(self, out_dir: Path) -> None:
        """Write everything exact resume needs (every rank calls), after save_hf wrote the same
        checkpoint's Hugging Face folder (which a strategy may read its weights back from)."""

    @abc.abstractmethod
    def load_state(self, state_dir: Path, hf_dir: Path) -> None:
        """Restore what save_state wrote, on the same layout; `hf_dir` is the checkpoint's Hugging
        Face folder beside it."""

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU (collective where sharded)."""

    @abc.abstractmethod
    def num_parameters(self) -> int: ...

    # -- written once for every strategy -------------------------------------------------------------
    def sync(self) -> None:
        """Wait for this rank's device, so a timer read after it measures finished work."""
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()

    def save_rank_state(self, path: Path, rng_extra: dict[str, Any] | None = None, **state: Any) -> None:
        """This rank's resume file: `state`, the skipped-step count and every RNG it draws from
        (plus `rng_extra`, e.g. megatron's tracker streams). Tensors and plain values only."""
        torch.save(
            {**state, "skipped_steps": self.skipped_steps,
             "rng": {**rng.capture(self.ctx.device), **(rng_extra or {})}},
            path,
        )  # fmt: skip

    def read_rank_state(self, path: Path) -> dict[str, Any]:
        return rng.load_state_file(path)

    def restore_rank_state(self, own: dict[str, Any]) -> None:
        """The part of a rank's resume file every strategy restores the same way."""
        self.skipped_steps = own["skipped_steps"]
        rng.restore(own["rng"], self.ctx.device)
