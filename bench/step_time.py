"""Step time, tokens/s, MFU and the split of a step, for one config, on the real Ray cluster.

    .venv/bin/python bench/step_time.py --steps 5 -- +experiment=smoke sft_train.device_mapping=[0]
    .venv/bin/python bench/step_time.py --steps 4 --out bench/results/demo-2w.json

Runs without Prefect (the stages are called directly) so only training is timed. The first step
is reported apart (warm-up); the rest are averaged. Figures are printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from report import emit  # bench/report.py (bench/ is on sys.path when run as a script)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from sft_core.cluster.cluster import Cluster
    from sft_core.config_loader import load_config
    from sft_core.data.encode import encode_files
    from sft_core.data.packing import plan_rows
    from sft_core.data.spec import EncodeSpec
    from sft_core.model.resolve import load_tokenizer, resolve_pretrained
    from sft_core.strategies.registry import strategy_for
    from sft_core.train.artifacts import SplitFiles, TrainArtifacts
    from sft_core.train.metrics import train_metrics

    cfg = load_config("sft_config", args.overrides)
    model_dir = resolve_pretrained(cfg.pretrain)
    strategy_for(cfg).preflight(cfg, str(model_dir))  # as the flow does, before workers start
    tok = load_tokenizer(model_dir)
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    data, _ = encode_files(cfg.sft_train.data_args.files(), tok, EncodeSpec.from_config(cfg))
    data.save(work / "train.npz")
    plan = plan_rows(data, cfg.sequence_length, cfg.sft_train.use_sequence_packing)
    (work / "plan.json").write_text(json.dumps(plan.to_dict()))
    tok.save_pretrained(work / "tokenizer")
    artifacts = TrainArtifacts(
        model_dir=str(model_dir),
        tokenizer_dir=str(work / "tokenizer"),
        train=SplitFiles(str(work / "train.npz"), str(work / "plan.json")),
    )
    from flows.ray_start import init_arguments

    address, kwargs = init_arguments(None)  # the pipeline's own local Ray: loopback, its token
    ray.init(address, **kwargs)
    try:
        t = time.perf_counter()
        cluster = Cluster(cfg)
        cluster.start(artifacts)
        info = cluster.execute_all("initialize")[0]
        startup = time.perf_counter() - t
        steps = [train_metrics(cluster.execute_all("train_step", s)) for s in range(args.steps)]
        cluster.shutdown()
    finally:
        ray.shutdown()

    steady = steps[1:] or steps
    keys = ["time/step_train", "time/data", "time/fwd_bwd", "time/optimizer", "time/comm",
            "sft_train/tokens_per_sec", "sft_train/supervised_tokens_per_sec", "sft_train/mfu",
            "sft_train/pad_ratio"]  # fmt: skip
    result = {
        "config": {
            "pretrain": cfg.pretrain,
            "strategy": cfg.sft_train.strategy_args.strategy_name,
            "workers": cfg.sft_train.world_size,
            "global_batch_rows": cfg.global_batch_size,
            "sequence_length": cfg.sequence_length,
            "overrides": args.overrides,
        },  # fmt: skip
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": info.device},
        "parameters": info.parameters,
        "peak_flops_per_worker": info.peak_flops,
        "startup_seconds": startup,
        "first_step": {k: steps[0][k] for k in keys if k in steps[0]},
        "steady_mean": {k: statistics.mean(s[k] for s in steady) for k in keys if k in steady[0]},
        "peak_memory_mb": {k: v for k, v in steps[-1].items() if k.startswith("memory/")},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
