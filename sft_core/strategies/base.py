"""The one interface every training strategy implements (ddp_train, fsdp2_train, megatron_train)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sft_core.data.collate import MicroBatch


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Strategy(Protocol):
    """Owns the model's distribution: wrapping, the step over micro-batches, evaluation, export."""

    name: str

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) among model replicas: which share of each global batch this rank trains on.
        Every rank for ddp/fsdp2; ranks of one tensor/pipeline group share a replica's data."""

    @property
    def reports_metrics(self) -> bool:
        """Whether this rank's loss and token counts are its replica's (exactly one rank per replica),
        so that summing over ranks counts each token once."""

    def initialize(self, model_dir: Path, total_steps: int) -> None:
        """Load the model from a Hugging Face folder, wrap it, build optimizer and scheduler."""

    def train_step(self, micro_batches: list[MicroBatch], num_targets: int) -> dict[str, float]:
        """One optimizer step. `num_targets` is the supervised-target count of the whole global batch."""

    def eval_step(self, micro_batches: list[MicroBatch]) -> tuple[float, int]:
        """(summed loss, supervised targets) over this rank's validation micro-batches."""

    def save_hf(self, out_dir: Path, tokenizer: Any, final: bool = False) -> None:
        """Write a Hugging Face folder (rank 0 writes; every rank calls); `final` at the run's end."""

    def save_state(self, out_dir: Path) -> None:
        """Write everything exact resume needs (every rank calls)."""

    def load_state(self, state_dir: Path) -> None:
        """Restore what save_state wrote, on the same layout."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU (collective where sharded)."""

    def num_parameters(self) -> int: ...
