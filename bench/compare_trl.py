"""Training beside TRL: the same model, rows, sequence length, global batch, steps and schedule.

    .venv/bin/python bench/compare_trl.py --quick --out bench/results/compare-trl-quick.json
    .venv/bin/python bench/compare_trl.py --model embedded:smollm2-135m-instruct --steps 8 \\
        --repeats 2 --out bench/results/compare-trl-135m.json

Contenders, run in alternation (A B C D, A B C D, ...) so that drift on a shared machine hits all:
  trl      TRL's SFTTrainer, packing (BFD) and padding-free, gradient checkpointing off, loss on the
           completion only; run in its own virtual environment (never a project dependency)
  ours-1w  `sft run` with 1 worker (the whole pipeline: Prefect, Ray, MLflow, checkpoint, registry)
  ours-2w  `sft run` with 2 workers (DDP), half the accumulation: the same global batch
  plain    a plain PyTorch loop, no framework, over the same global batches as ours (our packed rows
           and seeded order), with the same loss, parameter groups, schedule and allocator setting
           (keep_host_memory): the floor for a step
  trl-keep (on request, --only) TRL with our workers' allocator setting, through glibc's environment

Per run: steady s/step (median after the first two steps) and its forward+backward part, tokens/s and
supervised tokens/s, padding, peak RSS, the losses, and the whole command's wall time. Ours and the
plain loop must agree on every step's loss (max_loss_gap_vs_plain), or their speeds mean nothing.
The TRL venv is made on first use: a venv whose site-packages sees the project's (same torch and
transformers) plus trl, no deps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from encode_throughput import generate_rows  # bench/ is on sys.path when run as a script
from report import emit

REPO = Path(__file__).resolve().parents[1]
TRL_VENV = REPO / ".sft" / "bench-trl-venv"
TRL_VERSION = "1.16.0"


def trl_python() -> Path:
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        ours = next(p for p in sys.path if p.endswith("site-packages"))
        Path(site, "project-venv.pth").write_text(ours + "\n")
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--no-deps", f"trl=={TRL_VERSION}"], check=True
        )
    return python


TRL_SCRIPT = r"""
import json, resource, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
a = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(a["rows"])]
def convert(r):
    prompt = ([{"role": "system", "content": r["system"]}] if r.get("system") else []) + [
        {"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": r["output"]}]}
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(a["model"])
model = AutoModelForCausalLM.from_pretrained(a["model"], torch_dtype=torch.float32)
args = SFTConfig(output_dir=a["out"], max_length=a["seq"], packing=True, padding_free=True, gradient_checkpointing=False,
                 per_device_train_batch_size=1, gradient_accumulation_steps=a["accum"], max_steps=a["steps"],
                 learning_rate=a["lr"], lr_scheduler_type="cosine", warmup_steps=a["warmup"], weight_decay=0.01,
                 logging_steps=1, report_to=[], save_strategy="no", bf16=a["bf16"], use_cpu=True, seed=0,
                 dataloader_num_workers=0)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([convert(r) for r in rows]),
                     processing_class=tok)
ds = trainer.train_dataset
lengths = [len(x) for x in ds["input_ids"]]
if "labels" in ds.column_names:
    supervised = [sum(1 for x in l[1:] if x != -100) for l in ds["labels"]]
elif "completion_mask" in ds.column_names:
    supervised = [sum(m) for m in ds["completion_mask"]]
else:
    supervised = None
class Times(TrainerCallback):
    steps, losses = [], []
    def on_step_begin(self, *_, **__): self.t = time.perf_counter()
    def on_step_end(self, *_, **__): self.steps.append(time.perf_counter() - self.t)
    def on_log(self, _a, _s, _c, logs=None, **__):
        if logs and "loss" in logs: self.losses.append(logs["loss"])
trainer.add_callback(Times)
trainer.train()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
per_step = a["accum"]  # packed rows per optimizer step
print(json.dumps({"s_per_step": Times.steps, "losses": Times.losses, "peak_rss_mb": rss,
                  "tokens_per_step": per_step * sum(lengths) / len(lengths),
                  "supervised_per_step": per_step * sum(supervised) / len(supervised) if supervised else None,
                  "padding": 0.0, "packed_rows": len(lengths)}))
"""


def host_memory_env(keep: bool) -> dict[str, str]:
    """The allocator setting our workers start with (sft_core/train/host_memory.py), or none."""
    from sft_core.train.host_memory import KEEP_FREED_MEMORY_ENV

    return KEEP_FREED_MEMORY_ENV if keep else {}


def run_trl(rows: Path, model: Path, a: dict, keep_host_memory: bool = False) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sft-compare-trl-"))  # deleted after the run: checkpoints are GBs
    args = {**a, "rows": str(rows), "model": str(model), "out": str(work / "out")}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "datasets"), "OMP_NUM_THREADS": str(os.cpu_count()),
           **host_memory_env(keep_host_memory)}  # fmt: skip
    t = time.perf_counter()
    try:
        out = subprocess.run([str(trl_python()), "-c", TRL_SCRIPT, json.dumps(args)], capture_output=True,
                             text=True, env=env, check=False)  # fmt: skip
    finally:
        wall = time.perf_counter() - t
        shutil.rmtree(work, ignore_errors=True)
    if out.returncode != 0:
        raise SystemExit(f"TRL run failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    steady = statistics.median(r["s_per_step"][2:] or r["s_per_step"])
    return summary(steady, r["tokens_per_step"], r["supervised_per_step"], r["padding"], r["peak_rss_mb"],
                   r["losses"], wall)  # fmt: skip


def run_ours(rows: Path, model: Path, a: dict, workers: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sft-compare-"))
    overrides = [
        f"pretrain={model}", "exp_name=bench-compare", f"output_dir={work}/out", f"logging_dir={work}/tb",
        f"sequence_length={a['seq']}", f"sft_train.data_args.file_name={rows}", "validation=null",
        "metric_for_best_model=loss",
        "eval_at_start=false", "save_steps=100000", "eval_steps=100000", "logging_steps=1",
        f"sft_train.training_args.max_steps={a['steps']}", "sft_train.training_args.per_device_train_batch_size=1",
        f"sft_train.training_args.gradient_accumulation_steps={a['accum'] // workers}",
        f"sft_train.training_args.learning_rate={a['lr']}", f"sft_train.training_args.warmup_steps={a['warmup']}",
        f"sft_train.device_mapping=[{','.join(str(i) for i in range(workers))}]",
        f"sft_train.model_args.dtype={'bf16' if a['bf16'] else 'fp32'}",
        f"sft_train.keep_host_memory={a['keep_host_memory']}",
    ]  # fmt: skip
    try:
        return _run_ours(work, overrides, workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # checkpoints with optimizer state: GBs on the 135M model


def _run_ours(work: Path, overrides: list[str], workers: int) -> dict:
    from mlflow import MlflowClient

    t = time.perf_counter()
    out = subprocess.run([str(REPO / ".venv" / "bin" / "sft"), "run", *overrides], cwd=work, capture_output=True,
                         text=True, check=False)  # fmt: skip
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"sft run failed:\n{out.stderr[-3000:]}")
    uri = f"sqlite:///{work}/out/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]

    def series(name: str) -> list[float]:
        return [
            m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        ]

    steps = series("time/step_train")
    steady = statistics.median(steps[2:] or steps)
    tokens = statistics.median(series("sft_train/tokens_per_sec")[2:] or [0]) * steady
    supervised = statistics.median(series("sft_train/supervised_tokens")[2:] or [0])
    pad = statistics.fmean(series("sft_train/pad_ratio"))  # rows are all one width: the mean is the ratio
    rss = sum(max(series(f"memory/peak_mb_rank{r}")) for r in range(workers))
    out = summary(steady, tokens, supervised, pad, rss, series("sft_train/loss"), wall)
    return {**out, "s_fwd_bwd": statistics.median(series("time/fwd_bwd")[2:])}


PLAIN_SCRIPT = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, sys.argv[2])
from sft_core.config_loader import load_config
from sft_core.data.collate import collate_rows
from sft_core.data.encode import encode_files
from sft_core.data.packing import plan_rows
from sft_core.data.spec import EncodeSpec
from sft_core.model.load import load_causal_lm
from sft_core.model.resolve import load_tokenizer
from sft_core.train.batching import BatchSchedule
from sft_core.train.schedule import build_scheduler
a = json.loads(sys.argv[1])
tok = load_tokenizer(a["model"])
cfg = load_config("sft_config", [f"sequence_length={a['seq']}", f"pretrain={a['model']}"])
data, _ = encode_files([a["rows"]], tok, EncodeSpec.from_config(cfg))
plan = plan_rows(data, a["seq"], packing=True)
# The same global batches, parameter groups and schedule as `sft run`, so the losses must agree.
schedule = BatchSchedule(len(plan.rows), a["accum"], cfg.seed)
model = load_causal_lm(a["model"], torch.float32)  # the cache off: packed samples must not see each other
model.train()
groups = [[p for n, p in model.named_parameters() if (p.ndim < 2 or "norm" in n) == nd] for nd in (False, True)]
opt = torch.optim.AdamW([{"params": groups[0], "weight_decay": 0.01}, {"params": groups[1], "weight_decay": 0.0}],
                        lr=a["lr"])
sched = build_scheduler(opt, a["steps"], a["warmup"], 0.0, "cosine", 0.0)
times, fwd_bwd, losses, tokens, supervised, real = [], [], [], [], [], []
for step in range(a["steps"]):
    t = time.perf_counter()
    batches = [collate_rows(data, plan, [r], tok.pad_token_id) for r in schedule.global_batch(step)]
    n = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
    total = 0.0
    for b in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a["bf16"]):
            logits = model(input_ids=b.input_ids, position_ids=b.position_ids).logits
        targets = F.pad(b.labels[:, 1:], (0, 1), value=-100)  # shift labels, not the [T, V] logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               reduction="sum") / n
        loss.backward(); total += loss.item()
    fwd_bwd.append(time.perf_counter() - t)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t); losses.append(total)
    tokens.append(sum(b.num_tokens for b in batches)); supervised.append(n)
    real.append(sum(b.real_tokens for b in batches))
print(json.dumps({"s_per_step": times, "s_fwd_bwd": fwd_bwd, "losses": losses, "tokens": tokens, "supervised": supervised,
                  "padding": 1 - sum(real) / max(1, sum(tokens)),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_plain(rows: Path, model: Path, a: dict) -> dict:
    # Started with our workers' allocator setting: the same computation, without the framework.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **host_memory_env(a["keep_host_memory"])}
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, json.dumps({**a, "rows": str(rows), "model": str(model)}),
                          str(REPO)], capture_output=True, text=True, env=env, check=False)  # fmt: skip
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    steady = statistics.median(r["s_per_step"][2:] or r["s_per_step"])
    tokens, supervised = statistics.median(r["tokens"][2:]), statistics.median(r["supervised"][2:])
    out = summary(steady, tokens, supervised, r["padding"], r["peak_rss_mb"], r["losses"], wall)
    return {**out, "s_fwd_bwd": statistics.median(r["s_fwd_bwd"][2:])}


def summary(steady: float, tokens: float, supervised: float | None, padding: float, rss: float,
            losses: list[float], wall: float) -> dict:  # fmt: skip
    return {
        "s_per_step": steady,
        "tokens_per_s": tokens / steady,
        "supervised_tokens_per_s": supervised / steady if supervised else None,
        "padding": padding,
        "peak_rss_mb": rss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "wall_s": wall,
        "losses": losses,
    }


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "cpu")  # fmt: skip
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, 600 rows, 8 steps, 2 repeats")
    parser.add_argument("--model", default="embedded:tiny-smollm2")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--accum", type=int, default=2, help="packed rows per optimizer step (global batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--only",
        nargs="+",
        default=["trl", "ours-1w", "ours-2w", "plain"],
        help="contenders, alternated in this order; also trl-keep: TRL with our allocator setting",
    )
    parser.add_argument(
        "--no-keep-host-memory",
        dest="keep_host_memory",
        action="store_false",
        help="ours and the plain loop with glibc's default allocator (keep_host_memory=false)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.model, args.rows, args.seq, args.steps, args.repeats = "embedded:tiny-smollm2", 600, 512, 8, 2

    sys.path.insert(0, str(REPO))
    from sft_core.model.resolve import resolve_pretrained

    model = resolve_pretrained(args.model)
    rows_dir = Path(tempfile.mkdtemp(prefix="sft-compare-rows-"))
    try:
        compare(args, model, rows_dir / "rows.jsonl")
    finally:
        shutil.rmtree(rows_dir, ignore_errors=True)


def compare(args: argparse.Namespace, model: Path, rows: Path) -> None:
    rows.write_text("".join(json.dumps(r) + "\n" for r in generate_rows(args.rows)))
    a = {
        "seq": args.seq,
        "steps": args.steps,
        "accum": args.accum,
        "lr": 1e-4,
        "warmup": 2,
        "bf16": args.bf16,
        "keep_host_memory": args.keep_host_memory,
    }
    runners = {"trl": lambda: run_trl(rows, model, a), "trl-keep": lambda: run_trl(rows, model, a, True),
               "ours-1w": lambda: run_ours(rows, model, a, 1),
               "ours-2w": lambda: run_ours(rows, model, a, 2), "plain": lambda: run_plain(rows, model, a)}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for repeat in range(args.repeats):
        for name in args.only:
            runs[name].append(runners[name]())
            print(f"repeat {repeat + 1} {name}: {json.dumps(runs[name][-1])}", file=sys.stderr)
    median = {name: {k: statistics.median([r[k] for r in rs if r[k] is not None] or [0]) for k in rs[0]
                     if k != "losses"} for name, rs in runs.items()}  # fmt: skip
    # Ours and the plain loop train the same batches from the same weights: their per-step losses
    # must agree (to float reassociation: DDP buckets, the fp64 grad norm), or a speedup means nothing.
    if "plain" in runs:
        for name in ("ours-1w", "ours-2w"):
            if name in runs:
                pairs = [
                    zip(r["losses"], p["losses"], strict=True) for r in runs[name] for p in runs["plain"]
                ]
                median[name]["max_loss_gap_vs_plain"] = max(abs(x - y) for pair in pairs for x, y in pair)
    base = median.get("trl")
    ratios = {
        name: {"tokens_per_s_vs_trl": m["tokens_per_s"] / base["tokens_per_s"], "wall_vs_trl": m["wall_s"] / base["wall_s"]}
        for name, m in median.items() if base and name != "trl"
    }  # fmt: skip
    emit({"machine": machine(), "model": args.model,
          "rows": args.rows, "sequence_length": args.seq, "steps": args.steps, "global_batch_rows": args.accum,
          "bf16": args.bf16, "keep_host_memory": args.keep_host_memory, "repeats": args.repeats, "median": median, "ratios": ratios, "runs": runs},
         args.out)  # fmt: skip


if __name__ == "__main__":
    main()
