"""Model FLOPs utilization: what a step computes, over what the device could compute.

MFU = training FLOPs of the step / (step seconds x peak FLOP/s of every worker that ran it).

Numerator (per real token, padding excluded; recomputation under gradient checkpointing excluded):
  dense      (4 + 2 f) x N_matmul      forward 2N, backward 2N for activations + 2N x f for weight
                                       gradients (f = trained fraction: 1 full, 0 LoRA) = 6N in full FT
  attention  12 x layers x width x L   per token of a sample of length L (QK^T and AV, forward and
                                       backward, the full square as PaLM counts it)
A packed row attends within each sample only, so its attention term uses each sample's own length:

>>> shape = ModelShape(params=1000, layers=2, attn_width=8, embedding_params=0)
>>> training_flops(shape, real_tokens=6, attn_square_tokens=3**2 + 3**2)   # two samples of 3
39456.0
>>> 6 * 1000 * 6 + 12 * 2 * 8 * (9 + 9)
39456

Where the LM head runs only at the positions that have a target (TorchStrategy), its share of N
(vocab x hidden) is counted for those positions only: FLOPs not computed are not counted.

>>> head = ModelShape(params=1000, layers=2, attn_width=8, embedding_params=0, head_params=400)
>>> training_flops(head, real_tokens=6, attn_square_tokens=18, head_tokens=2)
29856.0
>>> 6 * (600 * 6 + 400 * 2) + 12 * 2 * 8 * 18
29856

N_matmul counts the weights that multiply: an untied input embedding is a lookup and is left out; a
tied one is the LM head's matmul and stays.

Denominator: on GPU the device's datasheet dense peak for the training dtype (table below, matched
on the device name; `sft_train.peak_tflops` overrides it). On CPU there is no datasheet: the peak is
measured once per machine (large matmuls, best of several repeats), cached under SFT_HOME by CPU,
thread count and dtype, and measured under a file lock so that no second worker times it at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s: (bf16/fp16, fp32).
# fp32 is the plain (non-TF32) figure, which is what torch's default matmul precision uses.
# The first name contained in the device name wins: specific variants come before their family.
GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("GH200", 989.4, 66.9),
    ("H200 NVL", 835.5, 60.0),
    ("H200", 989.4, 66.9),
    ("H100 NVL", 835.5, 60.0),
    ("H100 PCIe", 756.5, 51.2),
    ("H100", 989.4, 66.9),  # SXM
    ("H800", 989.4, 66.9),
    ("H20", 148.0, 44.0),
    ("B200", 2250.0, 75.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("A10G", 125.0, 31.2),  # the A10 datasheet; AWS's A10G runs lower clocks: set peak_tflops
    ("A10", 125.0, 31.2),
    ("A30", 165.0, 10.3),
    ("L40S", 362.1, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("RTX 6000 Ada", 364.2, 91.1),
    ("RTX A6000", 154.8, 38.7),
    ("RTX 4090", 165.2, 82.6),  # GeForce: fp32 accumulation runs at half the fp16-accumulate rate
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),  # fp16 (no bf16 tensor cores)
    ("T4", 65.0, 8.1),  # fp16
    ("MI300X", 1307.4, 163.4),
    ("MI250X", 383.0, 95.7),
]

CPU_MATMUL_SIZE = 2048  # 17 GFLOP per product: large enough for the BLAS to reach its steady rate
CPU_REPEATS = 8


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs to know about a model."""

    params: int  # all distinct parameters (a tied embedding counted once)
    layers: int
    attn_width: int  # heads x head_dim (the width of Q, K and V)
    embedding_params: int  # an untied input embedding's size (a lookup), else 0
    trained_fraction: float = 1.0  # 1.0 full fine-tuning; 0.0 LoRA (adapter FLOPs left out)
    head_params: int = 0  # the LM head's matmul (vocab x hidden), part of params - embedding_params

    @classmethod
    def from_hf_config(cls, config: PreTrainedConfig, params: int, lora: bool = False) -> ModelShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        tied = bool(getattr(config, "tie_word_embeddings", False))
        return cls(
            params=params,
            layers=config.num_hidden_layers,
            attn_width=heads * head_dim,
            embedding_params=0 if tied else config.vocab_size * config.hidden_size,
            trained_fraction=0.0 if lora else 1.0,
            head_params=config.vocab_size * config.hidden_size,
        )

    @property
    def matmul_params(self) -> int:
        return self.params - self.embedding_params


def training_flops(
    shape: ModelShape, real_tokens: int, attn_square_tokens: int, head_tokens: int | None = None
) -> float:
    """FLOPs of one forward + backward over `real_tokens`, whose packed samples have lengths L_i
    with sum(L_i^2) = `attn_square_tokens`, the LM head over `head_tokens` of them (default: all);
    see the module docstring."""
    head_tokens = real_tokens if head_tokens is None else head_tokens
    body = (shape.matmul_params - shape.head_params) * real_tokens + shape.head_params * head_tokens
    dense = (4 + 2 * shape.trained_fraction) * body
    attention = 12 * shape.layers * shape.attn_width * attn_square_tokens
    return float(dense + attention)


def row_square_lengths(offsets: np.ndarray, rows: Iterable[list[int]]) -> np.ndarray:
    """sum(L_i^2) over the samples of each packed row (offsets: sample boundaries in the token stream)."""
    lengths = np.diff(offsets).astype(np.int64)
    return np.array([int((lengths[list(r)] ** 2).sum()) for r in rows], dtype=np.int64)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Utilization in [0, 1]: a value above 1 would only say the peak was underestimated."""
    if peak_flops <= 0 or seconds <= 0:
        return 0.0
    return min(1.0, flops / seconds / peak_flops)


# -- peaks ------------------------------------------------------------------------------------------
def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Datasheet dense peak for `device_name` (torch.cuda.get_device_name()); None when unknown."""
    for name, half, single in GPU_PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return (single if dtype == torch.float32 else half) * 1e12
    return None


def cpu_key(threads: int, dtype: torch.dtype) -> str:
    """Cache key of a CPU peak. The model name alone is not enough (a VM may call every EPYC
    'AMD EPYC'): family, model number and the vector ISA torch uses tell the generations apart."""
    info = _cpuinfo()
    cpu = (
        f"{info.get('model name', 'cpu')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
        f"{torch.backends.cpu.get_cpu_capability()})"
    )
    return f"{cpu} | threads={threads} | {str(dtype).removeprefix('torch.')}"


def cpu_peak_flops(
    cache_dir: Path,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    size: int = CPU_MATMUL_SIZE,
) -> float:
    """The matmul peak of this CPU at `threads` threads, measured once and cached in
    `cache_dir/peak_flops.json`. The measurement holds an exclusive lock, so workers of one machine
    wait (idle) for the first one's figure instead of timing matmuls against each other."""
    threads = threads or torch.get_num_threads()
    key = cpu_key(threads, dtype)
    path = cache_dir / "peak_flops.json"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".peak_flops.lock"):
        cached = json.loads(path.read_text()) if path.is_file() else {}
        if key in cached:
            return float(cached[key]["flops"])
        flops, spread = measure_matmul_flops(dtype, threads, size)
        cached[key] = {"flops": flops, "spread": spread, "size": size, "repeats": CPU_REPEATS,
                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    return flops


def measure_matmul_flops(
    dtype: torch.dtype, threads: int, size: int = CPU_MATMUL_SIZE, repeats: int = CPU_REPEATS
) -> tuple[float, float]:
    """(best FLOP/s, (best - median) / best) of `repeats` square matmuls on the CPU. The best is
    the peak: on a shared machine interference only ever slows a repeat down."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, dtype=dtype)
        b = torch.randn(size, size, dtype=dtype)
        out = torch.empty(size, size, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up: thread pool, packing buffers
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    rates = sorted(2 * size**3 / t for t in times)
    best = rates[-1]
    return best, (best - rates[len(rates) // 2]) / best


def peak_flops(
    device: torch.device, dtype: torch.dtype, cache_dir: Path, peak_tflops: float | None = None
) -> tuple[float, str]:
    """(peak FLOP/s of one worker, where it came from). Order: `peak_tflops` (config), SFT_PEAK_FLOPS
    (environment), the GPU table, the cached or measured CPU peak. A GPU missing from the table is
    measured like a CPU would be, with a warning in the source string."""
    if peak_tflops:
        return peak_tflops * 1e12, "config peak_tflops"
    if os.environ.get("SFT_PEAK_FLOPS"):
        return float(os.environ["SFT_PEAK_FLOPS"]), "SFT_PEAK_FLOPS"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = gpu_peak_flops(name, dtype)
        if table:
            return table, f"datasheet {name} {str(dtype).removeprefix('torch.')}"
        measured = _measure_gpu(device, dtype)
        return measured, f"measured ({name} is not in the datasheet table: set peak_tflops)"
    return cpu_peak_flops(cache_dir, dtype), f"measured once, cached in {cache_dir / 'peak_flops.json'}"


def _measure_gpu(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, a)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        torch.mm(a, a)
    end.record()
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3)


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {k.strip(): v.strip() for k, v in re.findall(r"^([^:\n]+):(.*)$", first, flags=re.M)}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
