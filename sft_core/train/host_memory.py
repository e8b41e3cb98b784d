"""Keep freed host memory in the process for reuse, instead of handing it back to the OS.

glibc's malloc serves every block over 32 MiB (in a thread other than the main one: over 64 MiB,
or any block once its arena is full) with a fresh mmap, and unmaps it on free. A CPU training step
allocates and frees gigabytes in such blocks (logits, activations, gradients), so every step faults
each page in again: measured on SmolLM2-135M (1,024 tokens, bf16 autocast), ~270,000 minor page
faults per step. These settings serve all blocks from the one main heap and never shrink it, so a
freed block is reused already paged in (`bench/host_memory.py`: 1.04-1.23x on that step, by how
busy the VM was, 1.6x on a tiny model's; the same losses to the bit).

Kept memory stays resident: after a few steps RSS settles a little above the default's peak
(measured +5-15%), as with a GPU caching allocator. glibc reads these at process start, so they
are given as the environment of the training actors (Cluster); Ray runs actor methods in a thread
of their own, hence one arena. `sft_train.keep_host_memory: false` leaves glibc's defaults.
"""

from __future__ import annotations

from pathlib import Path

KEEP_FREED_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap (per-thread arenas mmap)
    "MALLOC_MMAP_MAX_": "0",  # no block is mmap'd: all come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),  # free never shrinks the heap
    "MALLOC_TOP_PAD_": str(64 * 2**20),  # grow it 64 MiB at a time (fewer brk calls while it grows)
}


def keeps_freed_memory() -> bool:
    """Whether this process was started with KEEP_FREED_MEMORY_ENV (glibc read it then)."""
    try:
        started_with = set(Path("/proc/self/environ").read_bytes().split(b"\0"))
    except OSError:  # not Linux
        return False
    return all(f"{k}={v}".encode() in started_with for k, v in KEEP_FREED_MEMORY_ENV.items())
