"""Packed micro-batches in the shape megatron's schedules take, and the loss they report."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sft_core.data import IGNORE_INDEX
from sft_core.data.collate import MicroBatch
from sft_core.strategies.megatron.layout import MegatronConfig


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] bool, True = masked: causal within each packed sample (a sample starts where
    its position id is 0), nothing across samples.

    >>> block_causal_mask(torch.tensor([[0, 1, 0, 1]]))[0, 0].int().tolist()
    [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 0, 0]]
    """
    doc = (position_ids == 0).cumsum(dim=1)
    same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)
    t = position_ids.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return (~(same_doc & causal)).unsqueeze(1)


@dataclass(frozen=True)
class MegatronBatches:
    batches: list[dict[str, torch.Tensor]]
    rows: int  # micro-batch size every stage exchanges
    width: int  # sequence length every stage exchanges


def megatron_batches(
    micro_batches: list[MicroBatch], layout: MegatronConfig, min_rows: int, device: torch.device
) -> MegatronBatches:
    """Pad every micro-batch to one [rows, width] shape (pipeline stages exchange fixed-shape
    activations), shift labels to megatron's convention (labels[t] is the target of token t) and
    turn ignored targets into a loss mask (megatron has no ignore index)."""
    rows = max(min_rows, max(mb.input_ids.size(0) for mb in micro_batches))
    width = max(mb.input_ids.size(1) for mb in micro_batches)
    multiple = math.lcm(
        layout.tensor_model_parallel_size if layout.sequence_parallel else 1, 2 * layout.context_parallel_size
    )
    width = -(-width // multiple) * multiple
    count = len(micro_batches)
    if layout.virtual_pipeline_model_parallel_size:  # the interleaved schedule needs a multiple of PP
        pp = layout.pipeline_model_parallel_size
        count = -(-count // pp) * pp
    out = []
    for i in range(count):
        input_ids = torch.zeros(rows, width, dtype=torch.long)
        labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width).repeat(rows, 1)
        if i < len(micro_batches):
            mb = micro_batches[i]
            b, t = mb.input_ids.shape
            input_ids[:b, :t], positions[:b, :t] = mb.input_ids, mb.position_ids
            labels[:b, : t - 1] = mb.labels[:, 1:]
            positions[:b, t:] = torch.arange(width - t)  # padding: a sample of its own
        loss_mask = labels != IGNORE_INDEX
        batch = {
            "input_ids": input_ids,
            "position_ids": positions,
            "labels": labels.masked_fill(~loss_mask, 0),
            "loss_mask": loss_mask.float(),
        }
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["attention_mask"] = block_causal_mask(batch["position_ids"])  # built where it is used
        out.append(batch)
    return MegatronBatches(out, rows, width)


def masked_loss(
    loss_mask: torch.Tensor, scale: float, per_token: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """megatron's loss function contract: (loss to backpropagate, values reported per micro-batch)."""
    summed = (per_token.float() * loss_mask).sum()
    return summed * scale, {"loss_sum": summed.detach(), "targets": loss_mask.sum().detach()}
