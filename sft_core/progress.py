"""Text progress bars for log lines: a run's console is a stream of log records (tasks run in Ray
workers), so progress is a bar inside a line, not a redrawn terminal widget."""

from __future__ import annotations


def bar(done: int, total: int, width: int = 20) -> str:
    """`[########------------]  40%`

    >>> bar(3, 6, width=10)
    '[#####-----]  50%'
    """
    frac = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
    filled = round(frac * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {frac:4.0%}"


def eta(seconds: float) -> str:
    """Seconds as h:mm:ss.

    >>> eta(3725.2)
    '1:02:05'
    """
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
