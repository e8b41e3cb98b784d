"""TensorBoard event files in logging_dir (or tracker_kwargs.log_dir)."""

from __future__ import annotations

from typing import Any

from torch.utils.tensorboard import SummaryWriter


class TensorBoardTracker:
    """One TensorBoard run: its own folder in the log folder, so runs sharing one are told apart.
    A run resumed from the checkpoint at step S logs again the steps after S that it logged before
    it stopped; `purge_step=S + 1` makes TensorBoard drop those earlier values instead of showing
    both."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def continue_after(self, step: int) -> None:
        """The run goes on from its checkpoint at `step` (its cluster restarted): what follows replaces
        what was logged after it."""
        self.writer.close()
        self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=step + 1)

    def log_params(self, params: dict[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(params.items()))
        self.writer.add_text("config", text, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()
