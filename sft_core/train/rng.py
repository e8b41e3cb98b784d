"""Every random generator a worker uses, captured and restored for exact resume.

Stored as tensors, ints and tuples only, so resume-state files load with `torch.load(...,
weights_only=True)`: a checkpoint folder someone hands you cannot run code when it is loaded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def capture(device: torch.device) -> dict[str, Any]:
    # legacy=True is numpy's default; the stub's overloads give the default call the dict form.
    legacy = np.random.get_state(legacy=True)
    assert isinstance(legacy, tuple)  # the tuple form: the global RandomState is MT19937
    name, keys, pos, has_gauss, cached = legacy
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }  # fmt: skip
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def load_state_file(path: str | Path) -> dict[str, Any]:
    """A resume-state file (rank<r>.pt / megatron_rank<r>.pt): tensors and plain values only."""
    return torch.load(path, weights_only=True)
