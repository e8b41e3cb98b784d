"""What writing a file costs on this machine by the size of its write() calls, on cold memory.

    .venv/bin/python bench/write_sizes.py --out bench/results/write-sizes.json

One file of --gib GiB written in calls of 64 KiB ... 64 MiB, then fsynced; wall and system seconds
per GiB. Before each, the previous file is deleted and the script waits --cool seconds: on a VM
that reports free pages to its host (Firecracker's page_reporting), freed memory goes back to the
host and the next touch of it is slow, so each write starts on cold memory, as a checkpoint of a
new step does. A probe of the machine, not of the pipeline: docs/benchmarks.md (2026-12-03) has
what it showed here and why the pipeline's writers were left as they are.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from one_process import REPO  # bench/ is on sys.path when run as a script
from report import emit


def timed(fn: Callable[[], None]) -> dict[str, float]:
    before, t = os.times(), time.perf_counter()
    fn()
    after = os.times()
    return {"wall_s": time.perf_counter() - t, "sys_s": after.system - before.system}


def write_file(path: Path, size: int, chunk: int) -> None:
    piece = b"\x5a" * chunk
    with open(path, "wb") as f:
        for _ in range(size // chunk):
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())


def by_call_size(scratch: Path, gib: float, cool: float) -> dict[str, Any]:
    size = int(gib * 2**30)
    out: dict[str, Any] = {}
    path = scratch / "file.bin"
    for chunk_kib in (64, 256, 1024, 64 * 1024, 64):  # 64 KiB twice: first and last, for drift
        path.unlink(missing_ok=True)
        time.sleep(cool)
        t = timed(lambda c=chunk_kib: write_file(path, size, c * 1024))
        per_gib = {k: round(v / gib, 2) for k, v in t.items()}
        out.setdefault(f"{chunk_kib} KiB calls", []).append(per_gib)
        print(f"{chunk_kib:>6} KiB calls: {per_gib['wall_s']:.2f} s/GiB wall, {per_gib['sys_s']:.2f} system",
              flush=True)  # fmt: skip
    path.unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--cool", type=float, default=12.0, help="seconds to wait after freeing memory")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    scratch = REPO / ".sft" / "bench-write-sizes"  # the disk checkpoints go to (/tmp may be tmpfs)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        result: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.release()}",
            "cool_s": args.cool,
            "file by write() size (per GiB)": by_call_size(scratch, args.gib, args.cool),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
