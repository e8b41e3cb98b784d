"""Where the seconds of a run go: the smoke run twice (the second warm: server up, data cached),
then the warm run's task runs read back from the Prefect server and its step times from MLflow.

    .venv/bin/python bench/overhead.py --out bench/results/overhead-smoke.json

Overhead = whole command wall time - the training steps' own time (sum of time/step_train).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from report import emit

REPO = Path(__file__).resolve().parents[1]


def sft_run(work: Path, extra: list[str]) -> tuple[float, str]:
    args = ["run", "+experiment=smoke", f"output_dir={work}/out", f"logging_dir={work}/tb", *extra]
    t = time.perf_counter()
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "sft"), *args], cwd=work, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return time.perf_counter() - t, out.stdout + out.stderr


async def task_times(api: str, flow_run_id: str) -> tuple[dict[str, float], float]:
    os.environ["PREFECT_API_URL"] = api
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        subflows = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *(str(f.id) for f in subflows)]
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    phases: dict[str, float] = defaultdict(float)
    for t in tasks:
        if t.start_time and t.end_time:
            name = re.sub(r"-(\d+|[0-9a-f]{3})(-\d+)?$", "", t.name)  # train-steps-0-3 -> train-steps
            phases[name] += (t.end_time - t.start_time).total_seconds()
    return dict(phases), (run.end_time - run.start_time).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sft-overhead-"))
    cold, _ = sft_run(work, args.overrides)
    warm, console = sft_run(work, args.overrides)
    api = re.search(r"Prefect server: (\S+)", console).group(1)
    flow_run_id = re.search(r"runs/flow-run/([0-9a-f-]{36})", console).group(1)
    phases, flow_s = asyncio.run(task_times(api, flow_run_id))

    sys.path.insert(0, str(REPO))
    from mlflow import MlflowClient

    uri = f"sqlite:///{work}/out/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"]
    )
    steps = sum(m.value for m in client.get_metric_history(runs[0].info.run_id, "time/step_train"))
    overhead = warm - steps
    emit({
        "config": ["+experiment=smoke", *args.overrides],
        "cold_wall_s": cold, "warm_wall_s": warm, "warm_flow_run_s": flow_s,
        "before_flow_run_s": warm - flow_s,  # CLI start-up, config, preflight, server check, Ray start
        "training_steps_s": steps, "overhead_s": overhead, "overhead_fraction": overhead / warm,
        "task_seconds": dict(sorted(phases.items(), key=lambda kv: -kv[1])),
    }, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
