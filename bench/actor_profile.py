"""Where the training actors' CPU time goes over a whole run, kernel included (Linux `perf`).

    .venv/bin/python bench/actor_profile.py --out bench/results/actor-profile-demo.json
    .venv/bin/python bench/actor_profile.py --experiment smoke

Runs `sft run` (the demo by default) in a scratch output_dir, attaches `perf record` (call graphs)
and `perf stat` (page faults, task clock) to the two training actors as soon as they start, and
reports: the share of samples in the kernel, the top symbols, and the page faults with the CPU
time spent zeroing fresh pages (clear_page*). A first touch of a page is a minor fault the kernel
answers with a zeroed page; on a VM that hands free memory back to its host, that zeroing is
where the host's own fault lands too. Needs perf_event_paranoid <= 2 (own processes).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import emit

REPO = Path(__file__).resolve().parents[1]


def actor_pids(root: int, want: int, timeout: float) -> list[int]:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            procs = psutil.Process(root).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        found = []
        for p in procs:
            try:
                if "SFTWorker" in " ".join(p.cmdline()):
                    found.append(p.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if len(found) >= want:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"the run did not start {want} training actors in {timeout:.0f} s")


def top_symbols(data: Path, n: int) -> list[dict[str, Any]]:
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "symbol", "-g", "none", "--stdio"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rows = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(.+?)\s*$", line)
        if m:
            rows.append({"percent": float(m[1]), "kernel": m[2] == "k", "symbol": m[3].split("  ")[0][:120]})
    return rows[:n] if n else rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="", help="conf/experiment/<name> ('' for the demo)")
    parser.add_argument("--workers", type=int, default=2, help="training actors to attach to")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        sys.exit("perf is not installed (apt install linux-tools-generic or the distribution's perf)")

    work = Path(tempfile.mkdtemp(prefix="sft-profile-"))
    extra = [f"+experiment={args.experiment}"] if args.experiment else []
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", f"output_dir={work}/out", f"logging_dir={work}/tb",
             *extra, *args.overrides],
            cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        began = time.perf_counter()
        pids = ",".join(map(str, actor_pids(run.pid, args.workers, timeout=300)))
        data = work / "perf.data"
        record = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", str(data), "-p", pids],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        stat = subprocess.Popen(["perf", "stat", "-x", ",", "-e", "page-faults,task-clock", "-p", pids],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        run.wait(timeout=1800)
        wall = time.perf_counter() - began
        for p in (record, stat):  # they end with the actors; a straggler is told to stop
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)
                p.wait(timeout=30)
        counters = {}
        for line in stat.stderr.read().splitlines() if stat.stderr else []:
            parts = line.split(",")
            if len(parts) > 2 and parts[0].replace(".", "").isdigit():
                counters[parts[2]] = float(parts[0])
        symbols = top_symbols(data, 0)
        kernel = sum(s["percent"] for s in symbols if s["kernel"])
        clearing = sum(s["percent"] for s in symbols if s["symbol"].startswith("clear_page"))
        cpu_s = counters.get("task-clock", 0.0) / 1000
        faults = counters.get("page-faults", 0.0)
        emit(
            {
                "command": ["sft", "run", *extra, *args.overrides],
                "exit_code": run.returncode,
                "wall_s_from_actor_start": round(wall, 1),
                "actor_cpu_s": round(cpu_s, 1),
                "page_faults": int(faults),
                "kernel_percent": round(kernel, 1),
                "clear_page_percent": round(clearing, 1),
                "clear_page_cpu_s": round(cpu_s * clearing / 100, 1),
                "us_per_fault_zeroing": round(1e6 * cpu_s * clearing / 100 / faults, 1) if faults else None,
                "top_symbols": symbols[: args.top],
                "cores": os.cpu_count(),
            },
            args.out,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
