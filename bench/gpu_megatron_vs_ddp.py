"""megatron_train (TP=1, PP=1) against ddp_train on one device: tokens/s, MFU, peak memory, losses.

    python bench/gpu_megatron_vs_ddp.py                       # one GPU, Qwen2.5-0.5B shape, bf16
    .venv/bin/python bench/gpu_megatron_vs_ddp.py --tiny      # CPU smoke test (fp32, gloo), < 1 min
    bash bench/gpu_check.sh                                   # the first, on a bare GPU machine

A model of the given shape is built with random weights (fixed seed) and saved as a Hugging Face
folder; each strategy then trains it in its own process (world size 1, no Ray / Prefect / Hydra), so
megatron's global parallel state and GPU memory cannot leak into the other run. Both see the same
synthetic packed rows (several samples per row, prompts unsupervised), a few warm-up steps, then
timed steps. MFU = 6 * parameters * tokens/s / peak (attention FLOPs left out, as in the worker).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from report import emit  # bench/report.py (bench/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("ddp_train", "megatron_train")
# Qwen2.5-0.5B, and a shape small enough to train a few steps on two CPU cores in seconds.
SHAPES = {
    "qwen2.5-0.5b": dict(layers=24, hidden=896, heads=14, kv_heads=2, ffn=4864, vocab=151936),
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=49152),
}
RUNS = {  # sequence length, micro-batch rows, accumulation, warm-up steps, timed steps
    "qwen2.5-0.5b": dict(seq=2048, micro=4, accum=2, warmup=3, steps=10),
    "tiny": dict(seq=256, micro=2, accum=2, warmup=1, steps=3),
}
ACTIVE_VOCAB = 4096  # tokens drawn from a small vocabulary: the loss has something to learn in a few steps


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small model and batches (CPU smoke test)")
    for name in (*SHAPES["tiny"], *RUNS["tiny"]):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (H100/H200 bf16 dense)")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--child-timeout", type=int, default=300, help="seconds per strategy run")
    p.add_argument("--out", default=None, help="JSON file (default: bench/results/megatron-vs-ddp-*.json)")
    # Set by the parent for the child process that runs one strategy.
    p.add_argument("--strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--peak-flops", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    preset = "tiny" if args.tiny else "qwen2.5-0.5b"
    for name, value in {**SHAPES[preset], **RUNS[preset]}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.preset = preset
    return args


# -- the model and the data -----------------------------------------------------------------------


def build_model(args: argparse.Namespace, out_dir: Path) -> int:
    """Random-weight Qwen2 of the requested shape, saved as safetensors; returns its parameter count."""
    config = transformers.Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        tie_word_embeddings=True,
        rope_theta=1e6,  # transformers 5 turns this into rope_parameters; 4.x keeps it as is
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        use_sliding_window=False,
    )
    torch.manual_seed(args.seed)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def packed_row(rng: np.random.Generator, seq: int, vocab: int) -> tuple[np.ndarray, ...]:
    """One full row of samples of random length: positions restart at 0 per sample, the prompt
    (at least the sample's first token) is unsupervised, the answer is labelled with its own ids."""
    ids = rng.integers(0, min(vocab, ACTIVE_VOCAB), seq)
    labels = np.full(seq, -100, dtype=np.int64)
    positions = np.zeros(seq, dtype=np.int64)
    start = 0
    while start < seq:
        n = min(int(rng.integers(seq // 8, seq // 2 + 1)), seq - start)
        prompt = int(rng.integers(1, max(2, n // 2)))
        positions[start : start + n] = np.arange(n)
        labels[start + prompt : start + n] = ids[start + prompt : start + n]
        start += n
    return ids, labels, positions


def synthetic_steps(args: argparse.Namespace, vocab: int) -> list[tuple[list[Any], int]]:
    """(micro-batches, supervised targets) per step, the same for every strategy (seeded)."""
    from sft_core.data.collate import MicroBatch

    rng = np.random.default_rng(args.seed)
    steps = []
    for _ in range(args.warmup + args.steps):
        micro = []
        for _ in range(args.accum):
            ids, labels, positions = zip(
                *(packed_row(rng, args.seq, vocab) for _ in range(args.micro)), strict=True
            )
            t = [torch.from_numpy(np.stack(a)).long() for a in (ids, labels, positions)]
            micro.append(MicroBatch(t[0], t[1], t[2], real_tokens=t[0].numel()))
        # labels[:, 1:] are the targets (sft_core/train/loss.py)
        steps.append((micro, sum(int((mb.labels[:, 1:] != -100).sum()) for mb in micro)))
    return steps


# -- one strategy, in a process of its own -----------------------------------------------------------


def run_strategy(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    from sft_core.config import validate_config
    from sft_core.strategies.base import DistContext
    from sft_core.strategies.registry import create_strategy

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    if on_gpu:
        torch.cuda.set_device(device)
    # megatron's parallel state needs a process group even for one rank; ddp_train gets the same.
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)

    total = args.warmup + args.steps
    megatron = args.strategy == "megatron_train"
    cfg = validate_config(
        {
            "pretrain": args.model_dir,
            "seed": args.seed,
            "sequence_length": args.seq,
            "sft_train": {
                "device_mapping": [0],
                "model_args": {"dtype": "bf16" if on_gpu else "fp32"},
                "training_args": {
                    "per_device_train_batch_size": args.micro,
                    "gradient_accumulation_steps": args.accum,
                    "learning_rate": args.lr,
                    "lr_scheduler_type": "constant",
                    "max_steps": total,
                },
                "data_args": {"file_name": "synthetic"},  # required by the config, never read here
                "strategy_args": {
                    "strategy_name": args.strategy,
                    "strategy_config": {"tensor_model_parallel_size": 1} if megatron else {},
                },
            },
        },
        source="bench config",
    )
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    strategy = create_strategy(cfg, DistContext(rank=0, world_size=1, device=device))
    strategy.initialize(Path(args.model_dir), total)
    init_s = time.perf_counter() - t
    params = strategy.num_parameters()

    steps = []
    data = synthetic_steps(args, transformers.AutoConfig.from_pretrained(args.model_dir).vocab_size)
    for i, (micro, targets) in enumerate(data):
        if on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = strategy.train_step(micro, targets)
        if on_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        real = sum(mb.real_tokens for mb in micro)
        steps.append({"seconds": seconds, "real_tokens": real, "targets": targets, **dataclasses.asdict(out)})
        print(f"[{args.strategy}] step {i}{' (warm-up)' if i < args.warmup else ''}: "
              f"loss {out.loss_sum / targets:.5f}  grad_norm {out.grad_norm:.4f}  "
              f"{seconds:.3f} s  {real / seconds:,.0f} tokens/s", flush=True)  # fmt: skip
    timed = steps[args.warmup :]
    seconds = sum(s["seconds"] for s in timed)
    tokens_per_sec = sum(s["real_tokens"] for s in timed) / seconds
    if on_gpu:
        memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        memory_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB: the process RSS
    losses = [s["loss_sum"] / s["targets"] for s in steps]
    extra = {}
    if megatron:  # its step builds a [B, 1, T, T] block mask per micro-batch on the host: what that costs
        from sft_core.strategies.megatron.batches import block_causal_mask

        t = time.perf_counter()
        for mb in data[-1][0]:
            block_causal_mask(mb.position_ids)
        extra["host_mask_seconds_per_step"] = time.perf_counter() - t
    dist.destroy_process_group()
    return {
        "strategy": args.strategy,
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({os.cpu_count()} cores)",
        "dtype": cfg.sft_train.model_args.dtype,
        "parameters": params,
        "init_seconds": init_s,
        "step_seconds_mean": seconds / len(timed),
        "step_seconds_min": min(s["seconds"] for s in timed),
        "fwd_bwd_seconds_mean": statistics.mean(s["time_fwd_bwd"] for s in timed),
        "optimizer_seconds_mean": statistics.mean(s["time_optimizer"] for s in timed),
        "tokens_per_sec": tokens_per_sec,
        "supervised_tokens_per_sec": sum(s["targets"] for s in timed) / seconds,
        "peak_flops": args.peak_flops,
        "mfu": 6 * params * tokens_per_sec / args.peak_flops,
        "peak_memory_gib": memory_gib,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if on_gpu else "process max RSS",
        "losses": losses,
        "grad_norms": [s["grad_norm"] for s in steps],
        **extra,
    }


# -- the parent: build once, run each strategy, compare ------------------------------------------------


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    ddp, mg = runs.get("ddp_train"), runs.get("megatron_train")
    if not (ddp and mg):
        return {}
    return {
        "tokens_per_sec_megatron_over_ddp": mg["tokens_per_sec"] / ddp["tokens_per_sec"],
        "peak_memory_megatron_over_ddp": mg["peak_memory_gib"] / ddp["peak_memory_gib"],
        "first_step_loss_abs_diff": abs(mg["losses"][0] - ddp["losses"][0]),
        "last_step_loss_abs_diff": abs(mg["losses"][-1] - ddp["losses"][-1]),
        "first_step_grad_norm_rel_diff": abs(mg["grad_norms"][0] / ddp["grad_norms"][0] - 1),
    }


def print_table(runs: dict[str, dict[str, Any]], comparison: dict[str, float]) -> None:
    head = f"{'strategy':<16}{'tokens/s':>12}{'MFU':>8}{'step s':>9}{'fwd+bwd s':>11}{'optim s':>9}{'mem GiB':>9}{'loss first':>12}{'loss last':>11}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in runs.items():
        print(f"{name:<16}{r['tokens_per_sec']:>12,.0f}{r['mfu']:>8.1%}{r['step_seconds_mean']:>9.3f}"
              f"{r['fwd_bwd_seconds_mean']:>11.3f}{r['optimizer_seconds_mean']:>9.3f}{r['peak_memory_gib']:>9.2f}"
              f"{r['losses'][0]:>12.5f}{r['losses'][-1]:>11.5f}")  # fmt: skip
    if comparison:
        c = comparison
        print(f"megatron/ddp: tokens/s x{c['tokens_per_sec_megatron_over_ddp']:.3f}, "
              f"memory x{c['peak_memory_megatron_over_ddp']:.3f}; |loss diff| first step "
              f"{c['first_step_loss_abs_diff']:.2e}, last step {c['last_step_loss_abs_diff']:.2e}; "
              f"grad norm first step rel. diff {c['first_step_grad_norm_rel_diff']:.2e}")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.strategy:  # child: one strategy, result to a file
        Path(args.result).write_text(json.dumps(run_strategy(args)))
        return

    # One MFU denominator for both runs: the flag on GPU, one matmul measurement on CPU (as the worker).
    if torch.cuda.is_available():  # no CUDA context in this process: the children own the GPU
        peak = args.peak_tflops * 1e12
    else:
        from sft_core.train.worker import measure_peak_flops

        peak = measure_peak_flops(torch.device("cpu"))
    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sft-mg-vs-ddp-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        params = build_model(args, work / "model")
        print(f"model: {args.preset} shape, {params:,} parameters, built and saved in "
              f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
        for name in args.strategies:
            result = work / f"{name}.json"
            child = [sys.executable, __file__, *sys.argv[1:], "--strategy", name, "--model-dir",
                     str(work / "model"), "--result", str(result), "--peak-flops", str(peak)]  # fmt: skip
            try:
                rc: int | str = subprocess.run(child, timeout=args.child_timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc == 0:
                runs[name] = json.loads(result.read_text())
            else:
                failed[name] = f"exit {rc}"
                print(f"{name} failed ({failed[name]}); see its output above", flush=True)

    comparison = compare(runs)
    device = next(iter(runs.values()))["device"] if runs else "?"
    kind = "cuda" if runs and not device.startswith("cpu") else "cpu"
    config = {k: getattr(args, k) for k in (*SHAPES["tiny"], *RUNS["tiny"], "seed", "lr")}
    result = {
        "config": {
            "preset": args.preset,
            **config,
            "parameters": params,
            "tokens_per_step": args.seq * args.micro * args.accum,
            "peak_flops": peak,
        },
        "machine": {
            "device": device,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "runs": runs,
        "failed": failed,
        "comparison": comparison,
    }
    emit(result, args.out or str(RESULTS / f"megatron-vs-ddp-{args.preset}-{kind}.json"))
    print_table(runs, comparison)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
