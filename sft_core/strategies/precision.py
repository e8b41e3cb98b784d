"""Which autocast dtype a strategy trains with. Weights, gradients and optimizer state stay fp32
(the master copy); bf16/fp16 is autocast of the forward (and so of the matmuls of the backward).

On CPU, bf16 pays only where the CPU multiplies bf16 natively (AVX512_BF16 / AMX on x86, the BF16
extension on Arm): elsewhere oneDNN has no bf16 kernel and a 2048^2 bf16 matmul measured 0.3 GFLOP/s
against 140 in fp32 (AMD EPYC Zen 3, 2 threads). Such CPUs train in fp32, and the log says so.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags / Arm features


@functools.cache
def cpu_supports_bf16() -> bool:
    """The CPU has bf16 multiply instructions and torch's oneDNN uses them. SFT_CPU_BF16=1 (or 0)
    overrides the detection (tests of the bf16 path on a CPU without it)."""
    forced = os.environ.get("SFT_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & _CPU_BF16_FLAGS) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def compute_dtype(requested: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the matmuls run in on `device` (the MFU peak is that dtype's)."""
    if requested == torch.float32 or device.type == "cuda":
        return requested
    return torch.bfloat16 if requested == torch.bfloat16 and cpu_supports_bf16() else torch.float32


def autocast_dtype(requested: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype to autocast to on `device` (None: plain fp32)."""
    dtype = compute_dtype(requested, device)
    if dtype != torch.float32:
        return dtype
    if requested == torch.float32:
        return None
    log.warning(
        "model_args.dtype=%s: this CPU has no native %s matmul (no AVX512_BF16/AMX), training in fp32",
        str(requested).removeprefix("torch."),
        str(requested).removeprefix("torch."),
    )
    return None
