"""Where the seconds of a run go: a run once to warm the caches, then `--repeats` warm runs
(server up, data cached), each taken apart into phases from the console log, the Prefect server's
task and subflow runs and MLflow's step times; the median of each phase is reported.

    .venv/bin/python bench/overhead.py --repeats 3 --out bench/results/overhead-smoke.json
    .venv/bin/python bench/overhead.py --experiment '' --repeats 2 ...   # the demo (`make demo`)
    .venv/bin/python bench/overhead.py --code /path/to/other/checkout ...   # the same, another version

Overhead = the whole command's wall time - the training steps' own time (sum of time/step_train).
The CPU seconds of every process of the run (the `sft` process, Ray's own processes, Ray workers,
the training actors, the Prefect server) are sampled too: on a machine with few cores, a phase is
slow as much because of what else burns CPU at that moment as because of its own work.

Runs alternate between versions when several `--code` are given (A B A B ...), so that a change in
the machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from report import emit

REPO = Path(__file__).resolve().parents[1]
LOG_TIME = re.compile(r"^(?:\S*\) )?(\d\d:\d\d:\d\d\.\d{3}) \| \w+ +\| (.*)$")


# -- CPU seconds per kind of process ---------------------------------------------------------------
_RAY_OWN = ("raylet", "gcs_server", "dashboard.py", "agent.py", "main.py", "log_monitor.py", "monitor.py")


def process_kind(cmdline: str, root: int, pid: int) -> str:
    if pid == root:
        return "sft process (flow)"
    if "SFTWorker" in cmdline:
        return "training actors"
    # The program: a binary, or the script python runs (raylet's own arguments name worker scripts).
    words = [w for w in cmdline.split()[:3] if not w.startswith("-")]
    program = next((w for w in words if not w.rsplit("/", 1)[-1].startswith("python")), "")
    if cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")) or program.endswith(_RAY_OWN):
        return "Ray's own processes"
    if "default_worker.py" in cmdline or cmdline.startswith("ray::"):
        return "Ray workers (tasks, idle)"
    return "other children"


class CpuSampler:
    """CPU seconds (user + system) of a process tree, sampled every `every` seconds (a process's
    last sample counts, so one that lives less than `every` may be missed), plus another process's
    (the Prefect server) growth over the same time."""

    def __init__(self, root: int, extra: int | None, every: float = 0.25):
        import psutil

        self.psutil, self.root, self.every = psutil, root, every
        self.seen: dict[int, tuple[str, float, float]] = {}  # pid: (name, user + system, system)
        self.extra = psutil.Process(extra) if extra else None
        self.extra_start = self._cpu(self.extra) if self.extra else (0.0, 0.0)
        self.extra_total = (0.0, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _cpu(p: Any) -> tuple[float, float]:
        t = p.cpu_times()
        return t.user + t.system, t.system

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                root = self.psutil.Process(self.root)
                procs = [root, *root.children(recursive=True)]
            except self.psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    cmd = " ".join(p.cmdline()) or p.name()
                    name = self.seen.get(p.pid, (cmd,))[0]
                    if "SFTWorker" in cmd or cmd.startswith("ray::"):
                        name = cmd  # Ray renames a worker after what it runs
                    self.seen[p.pid] = (name, *self._cpu(p))
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                    continue
            if self.extra:
                try:
                    now = self._cpu(self.extra)
                    self.extra_total = (now[0] - self.extra_start[0], now[1] - self.extra_start[1])
                except self.psutil.NoSuchProcess:
                    self.extra = None
            self._stop.wait(self.every)

    def stop(self) -> tuple[dict[str, float], dict[str, float]]:
        """({kind: user + system seconds}, {kind: system seconds}). System time is where this VM's
        slow first touch of memory shows (bench/write_sizes.py)."""
        self._stop.set()
        self._thread.join()
        kinds: dict[str, float] = defaultdict(float)
        system: dict[str, float] = defaultdict(float)
        for pid, (cmd, cpu, sys_cpu) in self.seen.items():
            kinds[process_kind(cmd, self.root, pid)] += cpu
            system[process_kind(cmd, self.root, pid)] += sys_cpu
        if self.extra_total[0]:
            kinds["Prefect server"], system["Prefect server"] = self.extra_total
        order = sorted(kinds, key=lambda k: -kinds[k])
        return {k: round(kinds[k], 2) for k in order}, {k: round(system[k], 2) for k in order}


# -- one run ---------------------------------------------------------------------------------------
def prefect_server_pid() -> int | None:
    import json

    home = Path(os.environ.get("PREFECT_HOME") or Path(os.environ.get("SFT_HOME", REPO / ".sft")) / "prefect")
    try:
        pid = json.loads((home / "server.json").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    import psutil

    return pid if psutil.pid_exists(pid) else None  # a record left by a server that has stopped


def sft_run(work: Path, code: Path, extra: list[str]) -> dict[str, Any]:
    args = ["run", f"output_dir={work}/out", f"logging_dir={work}/tb", *extra]
    env = {**os.environ, "PYTHONPATH": str(code)}
    began = datetime.now(UTC)
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sampler = CpuSampler(proc.pid, prefect_server_pid())
    console, _ = proc.communicate()
    wall = time.perf_counter() - t
    cpu, system = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(console[-3000:])
    return {
        "began": began,
        "wall": wall,
        "ended": began + timedelta(seconds=wall),
        "console": console,
        "cpu": cpu,
        "system": system,
    }


def log_events(console: str, began: datetime) -> list[tuple[datetime, str]]:
    """(time, message) of every timestamped console line (local clock times -> aware datetimes)."""
    local = began.astimezone()
    events = []
    for line in console.splitlines():
        m = LOG_TIME.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if not m:
            continue
        h, mi, s = m.group(1).split(":")
        at = local.replace(hour=int(h), minute=int(mi), second=int(float(s)), microsecond=int(s[-3:]) * 1000)
        if at < local - timedelta(hours=1):
            at += timedelta(days=1)
        events.append((at.astimezone(UTC), m.group(2)))
    return events


def first(events: list[tuple[datetime, str]], pattern: str) -> tuple[datetime, re.Match] | None:
    for at, msg in events:
        if m := re.search(pattern, msg):
            return at, m
    return None


async def prefect_runs(api: str, flow_run_id: str) -> tuple[Any, list[Any], list[Any]]:
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
    return run, subflows, tasks


def mlflow_figures(work: Path) -> dict[str, Any]:
    """The newest run's step times and what validation costs beside the forward compute of its tokens."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{work}/out/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"]
    )
    run = runs[0]

    def history(name: str) -> list[float]:
        return [
            m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        ]

    per_step = history("time/step_train")
    out: dict[str, Any] = {"steps": sum(per_step), "per_step": per_step}
    # Forward compute of the validation tokens, estimated from the training steps of the same run:
    # a step's fwd+bwd is ~3x its forward FLOPs, over the step's tokens (all ranks, in parallel).
    metrics, params = run.data.metrics, run.data.params
    val_rows = metrics.get("data/validation_rows")
    if val_rows is not None:
        seq = int(params["sequence_length"])
        val_tokens = val_rows * seq * (1 - metrics["data/validation_padding_fraction"])
        step_tokens = [t * s for t, s in zip(history("sft_train/tokens_per_sec"), per_step, strict=True)]
        fwd_bwd_per_token = statistics.median(
            f / t for f, t in zip(history("time/fwd_bwd"), step_tokens, strict=True)
        )
        forward_s = val_tokens * fwd_bwd_per_token / 3
        val_s = statistics.median(history("time/val"))
        out["validation"] = {
            "tokens": val_tokens,
            "seconds (median of the run's validations)": val_s,
            "forward compute estimate (s)": forward_s,
            "ratio": val_s / forward_s,
        }
    return out


def phases(run: dict[str, Any], work: Path) -> dict[str, Any]:
    """Split one warm run's wall time into phases (seconds)."""
    console = run["console"]
    api = re.search(r"Prefect server: (\S+)", console).group(1)
    flow_run_id = re.search(r"runs/flow-run/([0-9a-f-]{36})", console).group(1)
    flow, subflows, tasks = asyncio.run(prefect_runs(api, flow_run_id))
    events = log_events(console, run["began"])

    def span(t: Any) -> float:
        return (t.end_time - t.start_time).total_seconds() if t.start_time and t.end_time else 0.0

    def tasks_named(prefix: str) -> list[Any]:
        return [t for t in tasks if t.name.startswith(prefix)]

    figures = mlflow_figures(work)
    steps, per_step = figures["steps"], figures["per_step"]
    out: dict[str, Any] = {"wall": run["wall"], "training steps": steps}
    out["start-up before the flow run (CLI imports, config, checks, server, flow run created)"] = (
        flow.start_time - run["began"]
    ).total_seconds()
    # Ray: the old runner starts it in the flow run's set-up and waits; the new one in the background.
    old = first(events, r"Connecting to an existing Ray instance"), first(events, r"Using Ray cluster")
    new = first(events, r"Ray: up in ([\d.]+)s.*waited ([\d.]+)s")
    if old[0] and old[1]:
        out["Ray start (waited for)"] = (old[1][0] - old[0][0]).total_seconds()
        out["Ray start (total, in the background or not)"] = out["Ray start (waited for)"]
    elif new:
        out["Ray start (waited for)"] = float(new[1].group(2))
        out["Ray start (total, in the background or not)"] = float(new[1].group(1))
    begin = first(events, r"Beginning flow run")
    data_done = first(events, r"train: \d+ samples -> \d+ rows")
    folder = first(events, r"run folder ")
    cluster = tasks_named("start-cluster")
    if begin and data_done:
        out["data stages (resolve-model, load-tokenizer, encode, pack), as the flow waits"] = (
            data_done[0] - begin[0]
        ).total_seconds()
    if folder and cluster and cluster[0].start_time:
        between = (cluster[0].start_time - folder[0]).total_seconds()
        waited = out["Ray start (waited for)"] if new else 0.0
        out["MLflow set-up (run, params)"] = between - waited
    out["start-cluster (actors: start, imports, model load, process group)"] = sum(map(span, cluster))
    validate = [f for f in subflows if f.name.startswith("validate")]
    out["validation subflows"] = sum(map(span, validate))
    out["validation: val-step tasks inside them"] = sum(map(span, tasks_named("val-step")))
    out["train-steps tasks minus their steps (dispatch, logging)"] = (
        sum(map(span, tasks_named("train-steps"))) - steps
    )
    out["save-checkpoint"] = sum(map(span, tasks_named("save-checkpoint")))
    out["register-model"] = sum(map(span, tasks_named("register-model")))
    out["prune-checkpoints"] = sum(map(span, tasks_named("prune-checkpoints")))
    last_end = max(t.end_time for t in tasks if t.end_time)
    out["end (cluster shutdown, trackers closed, artifacts, Ray shutdown, exit)"] = (
        run["ended"] - last_end
    ).total_seconds()
    counted = [
        k for k in out
        if k not in ("wall", "Ray start (total, in the background or not)", "validation: val-step tasks inside them")
    ]  # fmt: skip
    out["the rest (between phases: dispatch, state round trips)"] = out["wall"] - sum(out[k] for k in counted)
    out["overhead"] = run["wall"] - steps
    out["first step / median step"] = (
        per_step[0] / statistics.median(per_step[1:]) if len(per_step) > 1 else 1.0
    )
    if "validation" in figures:
        out["validation / forward compute of its tokens"] = figures["validation"]["ratio"]
        out["validation tokens"] = figures["validation"]["tokens"]
    out["task seconds"] = {}
    for t in tasks:
        name = re.sub(r"-(\d+|[0-9a-f]{3})(-\d+)?$", "", t.name)  # train-steps-0-3 -> train-steps
        out["task seconds"][name] = out["task seconds"].get(name, 0.0) + span(t)
    out["cpu seconds"] = run["cpu"]
    out["system cpu seconds"] = run["system"]
    return out


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = list(dict.fromkeys(k for r in runs for k, v in r.items() if isinstance(v, float)))
    # A phase a run's console did not show (a line cut by a worker's output) is left out of its median.
    med: dict[str, Any] = {k: statistics.median(r[k] for r in runs if k in r) for k in keys}
    for nested in ("task seconds", "cpu seconds", "system cpu seconds"):
        names = {n for r in runs for n in r[nested]}
        med[nested] = {n: statistics.median(r[nested].get(n, 0.0) for r in runs) for n in sorted(names)}
    med["overhead fraction"] = med["overhead"] / med["wall"]
    return med


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per version")
    parser.add_argument(
        "--code", action="append", default=None, help="checkout to run (PYTHONPATH); repeat to compare"
    )
    parser.add_argument(
        "--experiment", default="smoke", help="conf/experiment/<name> ('' for the demo: the defaults)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.experiment:
        args.overrides = [f"+experiment={args.experiment}", *args.overrides]
    codes = [Path(c).resolve() for c in (args.code or [str(REPO)])]
    work = Path(tempfile.mkdtemp(prefix="sft-overhead-"))
    try:
        cold = {str(c): sft_run(work, c, args.overrides)["wall"] for c in codes}
        runs: dict[str, list[dict[str, Any]]] = {str(c): [] for c in codes}
        for i in range(args.repeats):
            for c in codes:
                load = os.getloadavg()[0]
                run = sft_run(work, c, args.overrides)
                result = phases(run, work)
                result["load average before"] = load
                runs[str(c)].append(result)
                print(
                    f"[{i + 1}/{args.repeats}] {c.name}: {run['wall']:.1f}s wall (load {load:.1f})",
                    file=sys.stderr,
                )
        emit(
            {
                "config": args.overrides,
                "cores": os.cpu_count(),
                "repeats": args.repeats,
                "versions": {
                    c: {"cold_wall_s": cold[c], "median": median_of(rs), "runs": rs} for c, rs in runs.items()
                },
            },
            args.out,
        )

    finally:
        shutil.rmtree(work, ignore_errors=True)  # a demo run's checkpoints are GBs


if __name__ == "__main__":
    main()
