"""The LM head at target positions only, against the head at every position: one training step.

    .venv/bin/python bench/head_at_targets.py --out bench/results/head-at-targets-135m.json
    .venv/bin/python bench/head_at_targets.py --model embedded:tiny-smollm2 --repeats 6

Two ddp_train strategies (1 process, fp32 or --bf16 autocast) load the same model and train on the same packed rows of
the demo data (encoded with the model's own template, packed to --seq tokens), alternating A/B
step by step so that machine noise hits both alike. Reported per variant: the median step, the
forward+backward part, the eval forward over the same rows, and the loss of every step (the two
must agree: only which logits are computed differs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from one_process import cpu_strategy, demo_rows  # bench/ is on sys.path when run as a script
from report import emit

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=1, help="packed rows per step (one micro-batch)")
    parser.add_argument("--repeats", type=int, default=4, help="steps per variant (after one warm-up each)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (where the CPU has native bf16)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from sft_core.data.collate import collate_rows

    model_dir, data, plan, pad_id = demo_rows(args.model, args.seq)
    steps = args.repeats + 1
    batches = [
        collate_rows(data, plan, list(range(i * args.rows, (i + 1) * args.rows)), pad_id)
        for i in range(steps)
    ]
    targets = [int((b.labels[:, 1:] != -100).sum()) for b in batches]

    variants = {}
    for name, selected in (("head at targets", True), ("head everywhere", False)):
        strategy = cpu_strategy(model_dir, args.bf16, steps)
        assert strategy.logits_at_targets_only, "this transformers has no boolean logits_to_keep"
        strategy.logits_at_targets_only = selected
        variants[name] = {"strategy": strategy, "step": [], "fwd_bwd": [], "eval": [], "loss": []}

    for i, (batch, n) in enumerate(zip(batches, targets, strict=True)):
        for v in variants.values():  # A then B on the same step's rows
            t = time.perf_counter()
            out = v["strategy"].train_step([batch], n)
            step_s = time.perf_counter() - t
            t = time.perf_counter()
            v["strategy"].eval_step([batch])
            eval_s = time.perf_counter() - t
            v["loss"].append(out.loss_sum / n)
            if i > 0:  # step 0 warms up
                v["step"].append(step_s)
                v["fwd_bwd"].append(out.time_fwd_bwd)
                v["eval"].append(eval_s)

    a, b = variants["head at targets"], variants["head everywhere"]
    result = {
        "model": args.model,
        "seq": args.seq,
        "rows_per_step": args.rows,
        "dtype": "bf16" if args.bf16 else "fp32",
        "supervised_fraction": sum(targets) / sum(int(x.labels.numel()) for x in batches),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "threads": torch.get_num_threads(),
        "max_loss_gap": max(abs(x - y) for x, y in zip(a["loss"], b["loss"], strict=True)),
    }
    for name, v in variants.items():
        result[name] = {
            "s_step": statistics.median(v["step"]),
            "s_fwd_bwd": statistics.median(v["fwd_bwd"]),
            "s_eval": statistics.median(v["eval"]),
            "steps_s": v["step"],
            "losses": v["loss"],
        }
    result["step_speedup"] = result["head everywhere"]["s_step"] / result["head at targets"]["s_step"]
    result["eval_speedup"] = result["head everywhere"]["s_eval"] / result["head at targets"]["s_eval"]
    emit(result, args.out)


if __name__ == "__main__":
    main()
