"""Metric trackers (MLflow, TensorBoard) behind one small interface, and the MLflow model registry."""

from __future__ import annotations

from typing import Any, Protocol

from sft_core.secrets import redact


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def continue_after(self, step: int) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class Trackers:
    """Fan out to several trackers."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        safe = redact(params)  # here, so no tracker and no caller can forget it
        for t in self.trackers:
            t.log_params(safe)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def continue_after(self, step: int) -> None:
        """Training goes on from the checkpoint at `step`: the steps after it are logged again."""
        for t in self.trackers:
            t.continue_after(step)

    def close(self, status: str = "FINISHED", skip: Tracker | None = None) -> None:
        """Close every tracker but `skip`, even after one fails (a tracking server gone must not
        cost the TensorBoard file its end); the first failure is raised."""
        failure: Exception | None = None
        for t in self.trackers:
            if t is skip:
                continue
            try:
                t.close(status)
            except Exception as err:
                failure = failure or err
        if failure is not None:
            raise failure


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys.

    >>> flatten({"a": {"b": 1}, "c": [1, 2]})
    {'a.b': 1, 'c': '[1, 2]'}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str | int | float | bool) or v is None else str(v)
    return out
