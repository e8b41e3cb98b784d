"""What a flow run shows on its Prefect page: the metrics table and the loss curves as artifacts."""

from __future__ import annotations

import math
import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from sft_core.train import metrics as m

_COLUMNS = ("step", m.LOSS, m.VAL_LOSS, m.GRAD_NORM, m.LR, m.TOKENS_PER_SEC)


def _key(exp_name: str, what: str) -> str:
    """Artifact keys take lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{exp_name}-{what}".lower()).strip("-")


def loss_chart(history: list[dict[str, Any]], width: int = 40) -> str:
    """Train and validation loss per step as a bar chart in markdown (one bar per logged point).

    >>> print(loss_chart([{"step": 1, "sft_train/loss": 2.0}, {"step": 2, "sft_train/loss": 1.0}], 4))
    | step | train loss | | validation loss | |
    |---:|---:|:---|---:|:---|
    | 1 | 2.0000 | `████` |  |  |
    | 2 | 1.0000 | `██` |  |  |
    """
    values = [h[k] for h in history for k in (m.LOSS, m.VAL_LOSS) if k in h and math.isfinite(h[k])]
    top = max(values, default=1.0) or 1.0

    def cells(value: float | None) -> str:
        if value is None:
            return "  |  |"
        if not math.isfinite(value):  # a diverged step: shown as it is, never the end of the run
            return f" {value} | `?` |"
        return f" {value:.4f} | `{'█' * max(1, round(width * value / top))}` |"

    lines = ["| step | train loss | | validation loss | |", "|---:|---:|:---|---:|:---|"]
    for h in history:
        lines.append(f"| {h['step']} |" + cells(h.get(m.LOSS)) + cells(h.get(m.VAL_LOSS)))
    return "\n".join(lines)


def publish_run_artifacts(exp_name: str, history: list[dict[str, Any]], summary: str) -> None:
    rows = [{c.split("/")[-1]: h.get(c) for c in _COLUMNS} for h in history]
    create_table_artifact(rows, key=_key(exp_name, "metrics"), description=f"{exp_name}: metrics per step")
    create_markdown_artifact(
        f"## {exp_name}: loss\n\n{loss_chart(history)}\n\n{summary}",
        key=_key(exp_name, "loss"),
        description="train and validation loss per step",
    )
