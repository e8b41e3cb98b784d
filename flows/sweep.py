"""`sft run --multirun`: Hydra's sweep syntax expanded into one run per combination.

    sft run --multirun +experiment=smoke sft_train.training_args.learning_rate=1e-4,3e-5 seed=1,2

`key=a,b`, `range(...)` and `choice(...)` sweep a key; every other override is passed as typed. The
runs go one after another, each an `sft run` process of its own (its own flow run, Ray cluster and
MLflow run; the Prefect server is shared), into the same output_dir, where each gets its own run
folder and its own registered versions of the one model, so `best` ranks the whole sweep.

Every combination is checked before the first starts: a bad value stops the sweep with nothing run.
A failed run does not stop the sweep; a stop from outside (Ctrl-C, SIGTERM), a lost server or a run
killed by a signal does. The exit code is the first failed run's, 0 if none failed.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_core.errors import ConfigError, UserError
from sft_core.secrets import move_secrets_to_env

RESULT_FILE_ENV = "SFT_RESULT_FILE"  # where flows/cli.py writes a finished run's result for the sweep
# Exit codes after which the sweep goes on: a failed run (1: a bug's traceback, 2: a user error). Not
# after 75 (a server stopped answering: the next run would meet it too), 130/143 or a signal's death.
_CARRY_ON = {1, 2}


@dataclass
class Job:
    overrides: list[str]
    swept: dict[str, str]  # each swept key and this run's value of it
    metric: str = "val_loss"  # its metric_for_best_model
    exit_code: int | None = None  # None: not run
    result: dict[str, Any] = field(default_factory=dict)


def expand(overrides: list[str]) -> list[Job]:
    """One run per combination of the swept values, in Hydra's order (the last key varies fastest).
    Overrides that sweep nothing are passed exactly as typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        axes: list[list[tuple[str, str | None]]] = []  # (override, the swept key or None)
        for text, override in zip(overrides, parsed, strict=True):
            if not override.is_sweep_override():
                axes.append([(text, None)])
                continue
            key = override.get_key_element()
            axes.append([(f"{key}={value}", key) for value in override.sweep_string_iterator()])
    except HydraException as err:
        if "ConfigLoader is not set" in str(err):  # glob(): would need the config groups' listing
            err = HydraException("glob() sweeps are not supported; list the values: key=a,b,c")
        raise ConfigError(f"cannot expand the sweep {' '.join(overrides)}: {err}") from None
    if any(not values for values in axes):
        raise ConfigError(f"the sweep {' '.join(overrides)} has a key with no value to take")
    return [
        Job([text for text, _ in combo], {key: text.split("=", 1)[1] for text, key in combo if key})
        for combo in itertools.product(*axes)
    ]


def plan(overrides: list[str], config_name: str, config_path: str | None) -> list[Job]:
    """The sweep's runs, each config loaded and checked against this machine and its files."""
    from sft_core.config_loader import load_config
    from sft_core.preflight import check_run_config

    jobs = expand(overrides)
    for n, job in enumerate(jobs, start=1):
        try:
            cfg = load_config(config_name, job.overrides, config_path)
            check_run_config(cfg)
        except UserError as err:
            raise UserError(f"sweep run {n} of {len(jobs)} ({_words(job.swept)}): {err}") from None
        job.metric = cfg.metric_for_best_model
        if len(jobs) > 1 and cfg.resume_from_checkpoint not in (False, "false"):
            # `auto` would continue whichever run of the sweep is newest, not this combination's own.
            raise ConfigError(
                "resume_from_checkpoint cannot be set for a sweep of several runs: each would continue "
                "the output_dir's newest run, whatever its values. Resume a run of a sweep alone: "
                "`sft run <its overrides> resume_from_checkpoint=auto`."
            )
    return jobs


def _words(swept: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in swept.items()) or "no swept key"


def run_sweep(overrides: list[str], config_name: str, config_path: str | None) -> int:
    # A secret typed on the command line goes to the environment the runs inherit, as in `sft run`:
    # never on their command lines, in the sweep's output or in a flow run's parameters.
    overrides = move_secrets_to_env(overrides, os.environ)
    jobs = plan(overrides, config_name, config_path)
    print(f"sweep: {len(jobs)} run(s), one after another", flush=True)
    stopped_by: signal.Signals | None = None
    for n, job in enumerate(jobs, start=1):
        print(f"\n==== sweep run {n} of {len(jobs)}: {_words(job.swept)}", flush=True)
        job.exit_code, job.result, stopped_by = _run_one(job.overrides, config_name, config_path)
        if stopped_by is not None or job.exit_code not in (0, *_CARRY_ON):
            break
    print_sweep_summary(jobs)
    if stopped_by is not None:
        return 128 + stopped_by
    return next((j.exit_code for j in jobs if j.exit_code), 0)


def _run_one(
    overrides: list[str], config_name: str, config_path: str | None
) -> tuple[int, dict[str, Any], signal.Signals | None]:
    """One `sft run` process. It runs in a process group of its own, so that a Ctrl-C reaches it once,
    passed on by the sweep (a second one would cut its cleanup short), and so does a SIGTERM."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config-name", config_name]
    if config_path is not None:
        cmd += ["--config-path", config_path]
    with tempfile.TemporaryDirectory(prefix="sft-sweep-") as tmp:
        result_file = Path(tmp) / "result.json"
        env = {**os.environ, RESULT_FILE_ENV: str(result_file)}
        stopped: list[signal.Signals] = []
        proc = subprocess.Popen([*cmd, *overrides], env=env, process_group=0)

        def pass_on(signum: int, _frame: object) -> None:
            stopped.append(signal.Signals(signum))
            proc.send_signal(signum)

        previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    return code, result, (stopped[0] if stopped else None)


def _exit_words(code: int | None) -> str:
    if code is None:
        return "not run"
    if code > 128 and code - 128 in signal.valid_signals():
        return f"{code} ({signal.Signals(code - 128).name})"
    return str(code)


def print_sweep_summary(jobs: list[Job]) -> None:
    keys = list(dict.fromkeys(k for j in jobs for k in j.swept))
    metrics = list(dict.fromkeys(j.metric for j in jobs))
    header = ["#", "exit", *keys, " / ".join(metrics), "registered version", "run folder"]
    rows = []
    for n, job in enumerate(jobs, start=1):
        r = job.result
        step_value = r.get("last_metric")
        rows.append([
            str(n),
            _exit_words(job.exit_code),
            *(job.swept.get(k, "") for k in keys),
            f"{step_value[1]:.4f} (step {step_value[0]})" if step_value else "-",
            f"models:/{r['registered_model']}/{r['model_version']}" if r.get("model_version") else "-",
            r.get("run_folder", "-"),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    ran = [j for j in jobs if j.exit_code is not None]
    failed = [j for j in ran if j.exit_code]
    print(f"\n==== sweep: {len(ran)} of {len(jobs)} run(s) ran, {len(failed)} failed")
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
