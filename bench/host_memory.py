"""Training steps with freed host memory kept for reuse (`keep_host_memory`) against glibc's default.

    .venv/bin/python bench/host_memory.py --bf16 --out bench/results/host-memory-135m-bf16.json
    .venv/bin/python bench/host_memory.py --model embedded:tiny-smollm2 --repeats 3

Each variant runs in a process of its own, started with or without KEEP_FREED_MEMORY_ENV (glibc
reads it at start), the two alternated --repeats times so that machine noise hits both alike. A process: one ddp_train
strategy (1 worker, as a Ray actor runs it) on the demo's train rows packed to --seq tokens, one
warm-up step, then --steps steps and an eval forward. Reported per variant: the median step, the
minor page faults per step, the eval forward, peak RSS and every step's loss (the two variants must
agree exactly: only where freed memory goes differs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from one_process import REPO, cpu_strategy, demo_rows  # bench/ is on sys.path when run as a script
from report import emit

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
VARIANTS = ("keep freed memory", "glibc default")


def child(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    from sft_core.data.collate import collate_rows
    from sft_core.train.host_memory import keeps_freed_memory

    applied = keeps_freed_memory()
    assert applied == (args.child == VARIANTS[0]), "the child's environment is not the variant's"
    model_dir, data, plan, pad_id = demo_rows(args.model, args.seq)
    batches = [collate_rows(data, plan, [i % len(plan.rows)], pad_id) for i in range(args.steps + 1)]
    strategy = cpu_strategy(model_dir, args.bf16, args.steps + 1)

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def rss_mb() -> float:  # resident now (kept memory is resident: it shows whether it keeps growing)
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    steps, step_faults, losses, rss = [], [], [], []
    for batch in batches:
        f, t = faults(), time.perf_counter()
        out = strategy.train_step([batch], int((batch.labels[:, 1:] != -100).sum()))
        steps.append(time.perf_counter() - t)
        step_faults.append(faults() - f)
        losses.append(out.loss_sum / out.targets)
        rss.append(rss_mb())
    t = time.perf_counter()
    strategy.eval_step(batches[:1])
    eval_s = time.perf_counter() - t
    return {
        "applied": applied,
        "warm_up_step_s": steps[0],
        "step_s": statistics.median(steps[1:]),
        "page_faults_per_step": statistics.median(step_faults[1:]),
        "eval_s": eval_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mb_after_each_step": rss,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per variant, alternated")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (where the CPU has native bf16)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    passthrough = [f"--model={args.model}", f"--seq={args.seq}", f"--steps={args.steps}"] + (
        ["--bf16"] if args.bf16 else []
    )
    sys.path.insert(0, str(REPO))
    from sft_core.train.host_memory import KEEP_FREED_MEMORY_ENV

    envs = {VARIANTS[0]: {**os.environ, **KEEP_FREED_MEMORY_ENV}, VARIANTS[1]: dict(os.environ)}
    for r in range(args.repeats):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            done = subprocess.run(
                [sys.executable, __file__, *passthrough, f"--child={variant}"],
                check=True, capture_output=True, text=True, env=envs[variant],
            )  # fmt: skip
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"repeat {r + 1} {variant}: {runs[variant][-1]['step_s']:.3f} s/step", file=sys.stderr)

    def median(variant: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[variant])

    summary = {
        v: {
            k: median(v, k)
            for k in ("step_s", "warm_up_step_s", "page_faults_per_step", "eval_s", "peak_rss_mb")
        }
        for v in VARIANTS
    }
    keep, default = VARIANTS
    emit(
        {
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
            "model": args.model,
            "seq": args.seq,
            "dtype": "bf16" if args.bf16 else "fp32",
            "summary": summary,
            "step_speedup": summary[default]["step_s"] / summary[keep]["step_s"],
            "eval_speedup": summary[default]["eval_s"] / summary[keep]["eval_s"],
            "max_loss_gap": max(
                abs(a - b)
                for x, y in zip(runs[keep], runs[default], strict=True)
                for a, b in zip(x["losses"], y["losses"], strict=True)
            ),
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
