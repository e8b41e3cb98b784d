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

from report import emit  # bench/report.py (bench/ is on sys.path when run as a script)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("keep freed memory", "glibc default")


def child(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch

    from sft_core.config_loader import load_config
    from sft_core.data.collate import collate_rows
    from sft_core.data.encode import encode_files
    from sft_core.data.messages import FieldMapping
    from sft_core.data.packing import plan_rows
    from sft_core.data.spec import EncodeSpec
    from sft_core.model.resolve import load_tokenizer, resolve_pretrained
    from sft_core.strategies.base import DistContext
    from sft_core.strategies.registry import create_strategy
    from sft_core.train.host_memory import keeps_freed_memory

    applied = keeps_freed_memory()
    assert applied == (args.child == VARIANTS[0]), "the child's environment is not the variant's"
    model_dir = resolve_pretrained(args.model)
    tok = load_tokenizer(model_dir)
    spec = EncodeSpec(args.seq, fields=FieldMapping(query_key="input"))
    data, _ = encode_files([str(REPO / "data/demo/train.jsonl")], tok, spec, limit=400)
    plan = plan_rows(data, args.seq, True)
    batches = [
        collate_rows(data, plan, [i % len(plan.rows)], tok.pad_token_id) for i in range(args.steps + 1)
    ]
    dtype = "bf16" if args.bf16 else "fp32"
    cfg = load_config("sft_config", ["sft_train.device_mapping=[0]", f"sft_train.model_args.dtype={dtype}"])
    torch.manual_seed(0)
    strategy = create_strategy(cfg, DistContext(0, 1, torch.device("cpu")))
    strategy.initialize(model_dir, total_steps=args.steps + 1)
    assert (strategy.autocast_dtype is not None) == args.bf16, "no native bf16 on this CPU"

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
