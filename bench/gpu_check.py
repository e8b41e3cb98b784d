"""ddp_train, fsdp2_train and megatron_train (TP=1, PP=1) beside TRL's SFTTrainer on one device: step time,
tokens/s, MFU, peak memory, losses, and the ratios between them. ddp_compiled (fsdp2_compiled) is
ddp_train (fsdp2_train) with `model_args.compile` (its decoder layers under torch.compile; the compile falls in the first warm-up
step, reported as first_step_seconds).

    python3 bench/gpu_check.py                                             # one GPU, bf16
    PYTHONPATH=. .sft/bench-trl-venv/bin/python bench/gpu_check.py --tiny  # CPU smoke (fp32), ~5 min
    bash bench/gpu_check.sh                    # the first, on a bare GPU machine (wheels, versions, log)

The CPU smoke needs a Python that has trl (bench/compare_trl.py makes that venv); --contenders picks.

A model of the given shape is built with random weights (fixed seed) and saved as a Hugging Face
folder; each contender then trains it in its own process (world size 1, no Ray / Prefect / Hydra), so
megatron's global parallel state, TRL's accelerator and GPU memory cannot leak into another run.
All three see the same synthetic packed rows (several samples per row, positions restarting at 0 per
sample, prompts unsupervised) in the same order: `micro` rows per micro-batch, `accum` micro-batches
per optimizer step, `warmup` steps, then `steps` timed steps. All train with AdamW (torch's, betas
0.9/0.999, eps 1e-8, no weight decay), a constant learning rate, clipping at 1.0, sdpa attention, no
gradient checkpointing, fp32 weights with bf16 autocast on GPU and plain fp32 on CPU.

The TRL contender is SFTTrainer with packing=True and padding_free=True. The rows are packed here and
handed over already tokenized (dataset_kwargs skip_prepare_dataset=True) in the columns TRL's own
packer writes: input_ids, labels (-100 on prompts) and seq_lengths (the lengths of the row's samples),
from which its collator rebuilds the same position ids: the token stream is ours, token for token.
Packing is a one-off before training for both, never part of a step. What still differs is TRL's:
  - its padding-free collator concatenates the `micro` rows of a micro-batch into one row of
    micro x seq tokens (ours keep [micro, seq]); samples still attend only within themselves
    (transformers builds the block-causal mask from the position ids), so the attention work is equal;
  - its fused LM head projects only the positions that have a target, where ours project all (on
    this data about a quarter of the LM head's work is spared), and it computes entropy and token
    accuracy of every micro-batch (a host sync each);
  - two settings differ from its defaults to train like ours: optim="adamw_torch" (transformers'
    default is the fused AdamW) and a sequential sampler in place of the Trainer's random one.
Its step time runs from on_step_begin to on_step_end: host-to-device copy, forward and backward,
clipping, optimizer, schedule, the span of our train_step (its fwd+bwd column holds the clipping too:
the Trainer calls back only after it). The time from one step's end to the next (which adds TRL's
batch fetching and per-step logging) is reported beside it as loop_step_seconds_mean.

MFU is one formula and one peak for every contender: the worker's (sft_core/train/mfu.py: 6N FLOPs
per token plus the attention term of each packed sample) over the datasheet peak on GPU or the
measured matmul peak on CPU; mfu_dense (6N per token only) is given beside it.
"""

from __future__ import annotations

import argparse
import contextlib
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
STRATEGIES = ("ddp_train", "fsdp2_train", "megatron_train")
COMPILED = {
    "ddp_compiled": "ddp_train",
    "fsdp2_compiled": "fsdp2_train",
}  # contender -> the strategy it runs with model_args.compile
CONTENDERS = (*STRATEGIES, *COMPILED, "trl")
# Qwen2.5-0.5B, and a shape small enough to train a few steps on two CPU cores in seconds.
SHAPES = {
    "qwen2.5-0.5b": dict(layers=24, hidden=896, heads=14, kv_heads=2, ffn=4864, vocab=151936),
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=49152),
}
# Sequence length, micro-batch rows, accumulation, warm-up and timed steps, seconds allowed to each
# contender's process. On an H200 (2026-12-04) a full-size step takes 0.26-0.52 s and a process 23-34 s,
# mostly imports, loading and conversion (megatron); the whole script (bench/gpu_check.sh, model built
# included, 13-15 s) ran in 99-147 s, the device call 120-173 s. The timeouts cap it at about 10 minutes. On CPU,
# TRL's LM head falls back to tiled torch code, and a tiny step takes it 10-30 s on two shared cores.
RUNS = {
    "qwen2.5-0.5b": dict(seq=2048, micro=4, accum=2, warmup=4, steps=16, timeout=150),
    "tiny": dict(seq=256, micro=2, accum=2, warmup=1, steps=3, timeout=600),
}
ACTIVE_VOCAB = 4096  # tokens drawn from a small vocabulary: the loss has something to learn in a few steps

Row = tuple[np.ndarray, np.ndarray, np.ndarray]  # input ids, labels, position ids of one packed row


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small model and batches (CPU smoke test)")
    for name in (*SHAPES["tiny"], *RUNS["tiny"]):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the datasheet / measured peak")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--out", default=None, help="JSON file (default: bench/results/gpu-check-*.json)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over the last warm-up step of each of ours: "
                        "the top kernels and ops by device time")  # fmt: skip
    # Set by the parent for the child process that runs one contender.
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--model-params", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
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


def packed_row(rng: np.random.Generator, seq: int, vocab: int) -> Row:
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


def synthetic_steps(args: argparse.Namespace) -> list[list[list[Row]]]:
    """Rows of each micro-batch of each step (warm-up and timed), the same for every contender."""
    rng = np.random.default_rng(args.seed)
    return [
        [[packed_row(rng, args.seq, args.vocab) for _ in range(args.micro)] for _ in range(args.accum)]
        for _ in range(args.warmup + args.steps)
    ]


def sample_lengths(positions: np.ndarray) -> list[int]:
    starts = np.flatnonzero(positions == 0)
    return np.diff(np.append(starts, len(positions))).tolist()


def step_targets(step: list[list[Row]]) -> int:
    """Supervised targets of a step: labels[1:] are the targets (sft_core/train/loss.py)."""
    return sum(int((labels[1:] != -100).sum()) for micro in step for _, labels, _ in micro)


def step_flops(step: list[list[Row]], shape: Any, head_at_targets: bool = False) -> float:
    """FLOPs of a step; with `head_at_targets` the LM head runs at the target positions only (ours)."""
    from sft_core.train.mfu import training_flops

    return sum(
        training_flops(
            shape,
            len(ids),
            int((np.array(sample_lengths(pos)) ** 2).sum()),
            int((labels[1:] != -100).sum()) if head_at_targets else None,
        )
        for micro in step
        for ids, labels, pos in micro
    )


# -- one contender, in a process of its own ---------------------------------------------------------


def device_and_peak(args: argparse.Namespace) -> tuple[torch.device, float, str]:
    from sft_core.home import sft_home
    from sft_core.train.mfu import peak_flops

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    return device, *peak_flops(device, dtype, sft_home(), args.peak_tflops)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_step(name: str, i: int, args: argparse.Namespace, s: dict[str, Any]) -> None:
    print(f"[{name}] step {i}{' (warm-up)' if i < args.warmup else ''}: loss {s['loss']:.5f}  "
          f"grad_norm {s['grad_norm']:.4f}  {s['seconds']:.3f} s  {s['tokens'] / s['seconds']:,.0f} tokens/s",
          flush=True)  # fmt: skip


def summarize(
    args: argparse.Namespace, device: torch.device, steps: list[dict[str, Any]], head: dict[str, Any]
) -> dict[str, Any]:
    """The figures every contender reports, from its per-step records."""
    timed = steps[args.warmup :]
    seconds = sum(s["seconds"] for s in timed)
    tokens_per_sec = sum(s["tokens"] for s in timed) / seconds
    on_gpu = device.type == "cuda"
    if on_gpu:
        memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import resource

        memory_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB: the process RSS
    return {
        **head,
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({os.cpu_count()} cores)",
        "dtype": "bf16" if on_gpu else "fp32",
        "step_seconds_mean": seconds / len(timed),
        "first_step_seconds": steps[0]["seconds"],
        "step_seconds_min": min(s["seconds"] for s in timed),
        "fwd_bwd_seconds_mean": statistics.mean(s["fwd_bwd"] for s in timed),
        "optimizer_seconds_mean": statistics.mean(s["optimizer"] for s in timed),
        "tokens_per_sec": tokens_per_sec,
        "supervised_tokens_per_sec": sum(s["targets"] for s in timed) / seconds,
        "mfu": sum(s["flops"] for s in timed) / seconds / head["peak_flops"],
        "mfu_dense": 6 * args.model_params * tokens_per_sec / head["peak_flops"],
        "peak_memory_gib": memory_gib,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if on_gpu else "process max RSS",
        "losses": [s["loss"] for s in steps],
        "grad_norms": [s["grad_norm"] for s in steps],
    }


def model_shape(args: argparse.Namespace) -> Any:
    from sft_core.train.mfu import ModelShape

    config = transformers.AutoConfig.from_pretrained(args.model_dir)
    return ModelShape.from_hf_config(config, args.model_params)


def run_strategy(args: argparse.Namespace) -> dict[str, Any]:
    """ddp_train, fsdp2_train or megatron_train, driven step by step as the worker drives it."""
    import torch.distributed as dist

    from sft_core.config import validate_config
    from sft_core.data.collate import MicroBatch
    from sft_core.strategies.base import DistContext
    from sft_core.strategies.registry import create_strategy

    device, peak, peak_source = device_and_peak(args)
    on_gpu = device.type == "cuda"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    # megatron's parallel state needs a process group even for one rank; ddp_train gets the same.
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)

    total = args.warmup + args.steps
    megatron = args.contender == "megatron_train"
    cfg = validate_config(
        {
            "pretrain": args.model_dir,
            "seed": args.seed,
            "sequence_length": args.seq,
            "sft_train": {
                "device_mapping": [0],
                "model_args": {"dtype": "bf16" if on_gpu else "fp32", "compile": args.contender in COMPILED},
                "training_args": {
                    "per_device_train_batch_size": args.micro,
                    "gradient_accumulation_steps": args.accum,
                    "learning_rate": args.lr,
                    "lr_scheduler_type": "constant",
                    "max_steps": total,
                },
                "data_args": {"file_name": "synthetic"},  # required by the config, never read here
                "strategy_args": {
                    "strategy_name": COMPILED.get(args.contender, args.contender),
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

    data = synthetic_steps(args)
    shape = model_shape(args)
    batches = []
    for step in data:
        micro = []
        for rows in step:
            ids, labels, positions = (torch.from_numpy(np.stack(a)).long() for a in zip(*rows, strict=True))
            micro.append(MicroBatch(ids, labels, positions, real_tokens=ids.numel()))
        batches.append((micro, step_targets(step)))
    steps = []
    profile: dict[str, Any] = {}
    for i, ((micro, targets), rows) in enumerate(zip(batches, data, strict=True)):
        profiling = args.profile and i == args.warmup - 1  # a warm-up step: the timed ones stay clean
        profiler = step_profiler(device) if profiling else contextlib.nullcontext()
        sync(device)
        t = time.perf_counter()
        with profiler:
            out = strategy.train_step(micro, targets)
            sync(device)
        record = {
            "seconds": time.perf_counter() - t,
            "fwd_bwd": out.time_fwd_bwd,
            "optimizer": out.time_optimizer,
            "loss": out.loss_sum / targets,
            "grad_norm": out.grad_norm,
            "tokens": sum(mb.real_tokens for mb in micro),
            "targets": targets,
            "flops": step_flops(rows, shape, strategy.logits_at_targets_only),
        }
        steps.append(record)
        print_step(args.contender, i, args, record)
        if profiling:
            profile = profile_summary(profiler, args.contender, record["seconds"])  # type: ignore[arg-type]
    extra: dict[str, Any] = {"profile": profile} if profile else {}
    if megatron:  # its step builds a [B, 1, T, T] block mask per micro-batch on the device: what that costs
        from sft_core.strategies.megatron.batches import block_causal_mask

        positions = [mb.position_ids.to(device) for mb in batches[-1][0]]
        sync(device)
        t = time.perf_counter()
        for p in positions:
            block_causal_mask(p)
        sync(device)
        extra["mask_seconds_per_step"] = time.perf_counter() - t
    result = summarize(
        args,
        device,
        steps,
        {
            "contender": args.contender,
            "parameters": strategy.num_parameters(),
            "init_seconds": init_s,
            "peak_flops": peak,
            "peak_source": peak_source,
        },
    )
    dist.destroy_process_group()
    return {**result, **extra}


def step_profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def profile_summary(profiler: Any, name: str, step_seconds: float, rows: int = 25) -> dict[str, Any]:
    """The profiled step's top ops by their own device time (on CPU, their own CPU time), printed and
    returned with each one's share of the step's total: on GPU the kernels' time, each kernel counted
    once (under the op that launched it). On GPU the step's wall time minus its kernel time is the
    time the device waited on the host (launches, syncs), the profiler's own cost included."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    ops = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    key = "self_device_time_total" if kernels else "self_cpu_time_total"
    total = (
        sum(e.self_device_time_total for e in kernels) if kernels else sum(e.self_cpu_time_total for e in ops)
    )
    total = total or 1.0
    top = sorted(ops, key=lambda e: getattr(e, key), reverse=True)[:rows]
    wall_ms = step_seconds * 1e3
    idle = f", device idle {wall_ms - total / 1e3:.1f} ms" if kernels else ""
    print(f"[{name}] profile of one step ({wall_ms:.1f} ms wall{idle}), top {rows} ops by {key} "
          f"(of {total / 1e3:.1f} ms):")  # fmt: skip
    table = []
    for e in top:
        ms = getattr(e, key) / 1e3
        table.append({"op": e.key, "ms": ms, "share": ms * 1e3 / total, "calls": e.count})
        print(f"  {ms:9.2f} ms {ms * 1e3 / total:6.1%} {e.count:6d}x  {e.key[:90]}")
    return {"by": key, "total_ms": total / 1e3, "step_wall_ms": wall_ms, "top": table}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's SFTTrainer on the same rows (see the module docstring for what differs)."""
    import datasets
    import trl
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    device, peak, peak_source = device_and_peak(args)
    on_gpu = device.type == "cuda"
    total = args.warmup + args.steps
    data = synthetic_steps(args)
    shape = model_shape(args)
    rows = [row for step in data for micro in step for row in micro]  # the sampler's order: step, micro, row
    dataset = datasets.Dataset.from_dict(
        {
            "input_ids": [ids.tolist() for ids, _, _ in rows],
            "labels": [labels.tolist() for _, labels, _ in rows],
            "seq_lengths": [sample_lengths(positions) for _, _, positions in rows],
        }
    )
    # The rows are token ids already: SFTTrainer only asks its tokenizer for a pad token.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
        pad_token="<pad>",
        unk_token="<unk>",
    )
    config = trl.SFTConfig(
        output_dir=str(Path(args.result).with_suffix(".trl-out")),
        max_steps=total,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=False,
        packing=True,
        padding_free=True,
        max_length=args.seq,
        dataset_kwargs={"skip_prepare_dataset": True},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=args.seed,
    )

    class Trainer(trl.SFTTrainer):
        step_loss: Any = 0.0  # the loss of the step so far (a tensor after its first micro-batch)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            return torch.utils.data.SequentialSampler(
                self.train_dataset if train_dataset is None else train_dataset
            )

        def training_step(self, *a: Any, **kw: Any) -> torch.Tensor:
            loss = super().training_step(*a, **kw)
            self.step_loss = self.step_loss + loss.detach()  # no host sync here
            return loss

    steps: list[dict[str, Any]] = []
    step_ends: list[float] = []
    counts = [{"tokens": sum(len(ids) for micro in step for ids, _, _ in micro), "targets": step_targets(step),
               "flops": step_flops(step, shape)} for step in data]  # fmt: skip

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            sync(device)
            self.begin = time.perf_counter()

        def on_pre_optimizer_step(self, *_: Any, **__: Any) -> None:
            sync(device)
            self.backward_done = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            sync(device)
            end = time.perf_counter()
            step_ends.append(end)
            steps.append({"seconds": end - self.begin, "fwd_bwd": self.backward_done - self.begin,
                          "optimizer": end - self.backward_done, "loss": float(trainer.step_loss),
                          **counts[len(steps)]})  # fmt: skip
            trainer.step_loss = 0.0

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: dict | None = None, **__: Any) -> None:
            if logs and "grad_norm" in logs and steps and "grad_norm" not in steps[-1]:
                steps[-1]["grad_norm"] = float(logs["grad_norm"])
                print_step("trl", len(steps) - 1, args, steps[-1])

    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Clock)
    init_s = time.perf_counter() - t
    trainer.train()
    if len(steps) != total:
        raise RuntimeError(f"TRL ran {len(steps)} optimizer steps, {total} asked for")
    for s in steps:
        s.setdefault("grad_norm", float("nan"))
    result = summarize(
        args,
        device,
        steps,
        {
            "contender": "trl",
            "parameters": sum(p.numel() for p in model.parameters()),
            "init_seconds": init_s,
            "peak_flops": peak,
            "peak_source": peak_source,
        },
    )
    # Step end to step end: the step plus TRL's batch fetching and logging (from the first timed step
    # on, given a step before it).
    loop = np.diff(step_ends)[max(args.warmup, 1) - 1 :]
    if len(loop):
        result["loop_step_seconds_mean"] = float(loop.mean())
        result["loop_tokens_per_sec"] = steps[-1]["tokens"] / float(loop.mean())
    result["versions"] = {m.__name__: m.__version__ for m in (trl, datasets, transformers, torch)}
    return result


# -- the parent: build once, run each contender, compare -----------------------------------------------


PAIRS = (
    ("ddp_compiled", "ddp_train"),
    ("fsdp2_compiled", "fsdp2_train"),
    ("megatron_train", "ddp_train"),
    ("fsdp2_train", "ddp_train"),
    ("ddp_train", "trl"),
    ("fsdp2_train", "trl"),
    ("megatron_train", "trl"),
    ("ddp_compiled", "trl"),
)
SHORT = {
    "ddp_compiled": "ddp_compiled",
    "fsdp2_compiled": "fsdp2_compiled",
    "ddp_train": "ddp",
    "fsdp2_train": "fsdp2",
    "megatron_train": "megatron",
    "trl": "trl",
}


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Ratios a / b of each pair that ran, and how far their losses and first gradient norm lie apart."""
    out = {}
    for a, b in PAIRS:
        ra, rb = runs.get(a), runs.get(b)
        if not (ra and rb):
            continue
        out[f"{SHORT[a]}_over_{SHORT[b]}"] = {
            "tokens_per_sec": ra["tokens_per_sec"] / rb["tokens_per_sec"],
            "step_seconds": ra["step_seconds_mean"] / rb["step_seconds_mean"],
            "peak_memory": ra["peak_memory_gib"] / rb["peak_memory_gib"],
            "first_step_loss_abs_diff": abs(ra["losses"][0] - rb["losses"][0]),
            "last_step_loss_abs_diff": abs(ra["losses"][-1] - rb["losses"][-1]),
            "first_step_grad_norm_rel_diff": abs(ra["grad_norms"][0] / rb["grad_norms"][0] - 1),
        }
    return out


def print_table(runs: dict[str, dict[str, Any]], comparison: dict[str, dict[str, float]]) -> None:
    head = f"{'contender':<16}{'tokens/s':>12}{'MFU':>8}{'step s':>9}{'fwd+bwd s':>11}{'optim s':>9}{'1st step s':>11}{'mem GiB':>9}{'loss first':>12}{'loss last':>11}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in runs.items():
        print(f"{name:<16}{r['tokens_per_sec']:>12,.0f}{r['mfu']:>8.1%}{r['step_seconds_mean']:>9.3f}"
              f"{r['fwd_bwd_seconds_mean']:>11.3f}{r['optimizer_seconds_mean']:>9.3f}{r['first_step_seconds']:>11.2f}"
              f"{r['peak_memory_gib']:>9.2f}"
              f"{r['losses'][0]:>12.5f}{r['losses'][-1]:>11.5f}")  # fmt: skip
    for pair, c in comparison.items():
        print(f"{pair.replace('_over_', '/')}: tokens/s x{c['tokens_per_sec']:.3f}, memory x{c['peak_memory']:.3f}; "
              f"|loss diff| first step {c['first_step_loss_abs_diff']:.2e}, last step {c['last_step_loss_abs_diff']:.2e}; "
              f"grad norm first step rel. diff {c['first_step_grad_norm_rel_diff']:.2e}")  # fmt: skip
    if "loop_step_seconds_mean" in runs.get("trl", {}):
        r = runs["trl"]
        print(f"trl step end to step end (with its batch fetching and logging): {r['loop_step_seconds_mean']:.3f} s, "
              f"{r['loop_tokens_per_sec']:,.0f} tokens/s")  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.contender:  # child: one contender, result to a file
        run = run_trl if args.contender == "trl" else run_strategy
        Path(args.result).write_text(json.dumps(run(args)))
        return

    if not torch.cuda.is_available():  # no CUDA context in this process: the children own the GPU
        from sft_core.home import sft_home
        from sft_core.train.mfu import cpu_peak_flops

        cpu_peak_flops(sft_home(), torch.float32)  # measured once here, cached for the children
    runs: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sft-gpu-check-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        params = build_model(args, work / "model")
        print(f"model: {args.preset} shape, {params:,} parameters, built and saved in "
              f"{time.perf_counter() - t:.1f} s", flush=True)  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_CACHE": str(work / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        for name in args.contenders:
            result = work / f"{name}.json"
            child = [sys.executable, __file__, *sys.argv[1:], "--contender", name, "--model-dir",
                     str(work / "model"), "--model-params", str(params), "--result", str(result)]  # fmt: skip
            t = time.perf_counter()
            try:
                rc: int | str = subprocess.run(child, env=env, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {args.timeout} s"
            print(f"{name}: process {time.perf_counter() - t:.1f} s", flush=True)
            if rc == 0:
                runs[name] = json.loads(result.read_text())
            else:
                failed[name] = f"exit {rc}" if isinstance(rc, int) else rc
                print(f"{name} failed ({failed[name]}); see its output above", flush=True)

    comparison = compare(runs)
    device = next(iter(runs.values()))["device"] if runs else "?"
    kind = "gpu" if runs and not device.startswith("cpu") else "cpu-smoke"
    config = {k: getattr(args, k) for k in (*SHAPES["tiny"], *RUNS["tiny"], "seed", "lr")}
    result = {
        "kind": kind,
        **(
            {"note": "CPU smoke test of the script (tiny model, fp32, shared cores): not a speed figure"}
            if kind == "cpu-smoke"
            else {}
        ),  # fmt: skip
        "config": {
            "preset": args.preset,
            **config,
            "parameters": params,
            "tokens_per_step": args.seq * args.micro * args.accum,
            "contenders": args.contenders,
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
    emit(result, args.out or str(RESULTS / f"gpu-check-{args.preset}-{kind}.json"))
    print_table(runs, comparison)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
