"""TensorBoard event files in logging_dir (or tracker_kwargs.log_dir)."""

from __future__ import annotations

from typing import Any

from torch.utils.tensorboard import SummaryWriter


class TensorBoardTracker:
    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def log_params(self, params: dict[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))
        self.writer.add_text("config", text, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()
