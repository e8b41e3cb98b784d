"""Encode + pack throughput on 50,000 generated rows, beside TRL SFTTrainer's own data preparation.

    .venv/bin/python bench/encode_throughput.py --out bench/results/encode-throughput.json

TRL is not a project dependency: it runs in its own venv (made once; the script tells how if it is
missing) on the same rows, same tokenizer (SmolLM2), same max length, packing on, in the same run:

    python3 -m venv .sft/bench-trl-venv && .sft/bench-trl-venv/bin/pip install torch==2.13.0 \\
        && .sft/bench-trl-venv/bin/pip install transformers==5.24.0 datasets==5.2.0 accelerate==1.15.0 trl==1.16.0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import emit  # bench/report.py (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
WORDS = ["the", "a", "model", "data", "answer", "question", "short", "long", "river", "city", "number", "seven", "blue", "green", "quickly", "because", "however", "train", "token", "sample", "pack", "label", "loss", "value", "reason", "simple", "explain", "list"]  # fmt: skip


def generate_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    rows = []
    for i in range(n):
        row = {"instruction": text(5, 30), "input": text(0, 40) if i % 2 else "", "output": text(5, 120)}
        if i % 5 == 0:
            row["system"] = text(4, 12)
        rows.append(row)
    return rows


def ours(path: Path, model_dir: Path, max_length: int, workers: int) -> dict[str, float]:
    from sft_core.config_loader import load_config
    from sft_core.data.encode import encode_files
    from sft_core.data.packing import plan_rows
    from sft_core.data.spec import EncodeSpec
    from sft_core.model.resolve import load_tokenizer

    tok = load_tokenizer(model_dir)
    # The demo config's encoding (native template, alpaca mapping with input and system), as a run builds it.
    spec = EncodeSpec.from_config(load_config("sft_config", [f"sequence_length={max_length}"]))
    t = time.perf_counter()
    data, _ = encode_files([str(path)], tok, spec, workers=workers)
    t_encode = time.perf_counter() - t
    plan = plan_rows(data, max_length, packing=True)
    total = time.perf_counter() - t
    return {"samples": len(data), "rows": len(plan.rows), "encode_s": t_encode, "total_s": total,
            "samples_per_s": len(data) / total, "padding_fraction": plan.padding_fraction(data)}  # fmt: skip


TRL_SCRIPT = r"""
import json, sys, time, tempfile
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
rows_path, model_dir, max_length, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(l) for l in open(rows_path)]
def convert(r):
    prompt = ([{"role": "system", "content": r["system"]}] if r.get("system") else []) + [
        {"role": "user", "content": r["instruction"] + ("\n" + r["input"] if r["input"] else "")}]
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": r["output"]}]}
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
def build(data):
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_length=max_length, packing=True, bf16=False,
                     dataset_num_proc=workers if workers > 1 else None, report_to=[])
    t = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    return time.perf_counter() - t, len(trainer.train_dataset)
converted = [convert(r) for r in rows]  # format conversion is not timed
overhead, _ = build(converted[:16])
seconds, packed_rows = build(converted)
print(json.dumps({"samples": len(rows), "rows": packed_rows, "total_s": seconds - overhead,
                  "samples_per_s": len(rows) / (seconds - overhead)}))
"""


def trl(python: Path, path: Path, model_dir: Path, max_length: int, workers: int) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": tempfile.mkdtemp()}  # fmt: skip
    out = subprocess.run([str(python), "-c", TRL_SCRIPT, str(path), str(model_dir), str(max_length), str(workers)],
                         capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"TRL run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trl-python", default=str(REPO / ".sft" / "bench-trl-venv" / "bin" / "python"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sft_core.model.resolve import resolve_pretrained

    model_dir = resolve_pretrained("embedded:tiny-smollm2")  # SmolLM2's tokenizer and template
    path = Path(tempfile.mkdtemp()) / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_rows(args.rows)))
    result: dict = {
        "rows": args.rows,
        "max_length": args.max_length,
        "cpus": os.cpu_count(),
        "ours": {},
        "trl": {},
    }
    for w in args.workers:
        result["ours"][f"workers={w}"] = ours(path, model_dir, args.max_length, w)
        print(
            f"ours  workers={w}: {result['ours'][f'workers={w}']['samples_per_s']:.0f} samples/s", flush=True
        )
    if Path(args.trl_python).exists():
        for w in args.workers:
            result["trl"][f"workers={w}"] = trl(Path(args.trl_python), path, model_dir, args.max_length, w)
            print(
                f"TRL   workers={w}: {result['trl'][f'workers={w}']['samples_per_s']:.0f} samples/s",
                flush=True,
            )
        for w in args.workers:
            key = f"workers={w}"
            result[f"ratio_{key}"] = (
                result["ours"][key]["samples_per_s"] / result["trl"][key]["samples_per_s"]
            )
    else:
        print(f"TRL venv not found at {args.trl_python}; see this script's docstring", file=sys.stderr)
    emit(result, args.out)


if __name__ == "__main__":
    main()
