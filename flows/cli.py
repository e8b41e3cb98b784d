"""The `sft` command.

    sft run [--config-path DIR] [--config-name NAME] [key=value ...]   run the pipeline
    sft server stop                                                     stop the local Prefect server

Overrides are Hydra's: `sft run +experiment=smoke sft_train.training_args.learning_rate=1e-4`.

Stopping a run: Ctrl-C, SIGTERM to the `sft` process, or `prefect flow-run cancel <id>` (delivered
by the run's own watch, flows/cancel_watch.py; the UI offers Cancel only for deployment runs) ends
it at once, with the actors killed, its MLflow run KILLED and its run folder free for
`resume_from_checkpoint=auto`; the command exits with 128 + the signal (130, 143) and a cancelled
flow run ends Cancelled. SIGTERMs after the first are ignored while the run cleans up (a second
Ctrl-C is not). A Prefect server that stops answering mid-run ends it with exit code 75
(EX_TEMPFAIL: start it again with resume_from_checkpoint=auto).
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import json
import os
import shlex
import signal
import sys
import textwrap
import threading
import time
from typing import Any, NoReturn

from flows.runtime import (
    DEFAULT_PORT,
    PrefectServerError,
    ensure_server,
    lost_prefect_api,
    set_local_defaults,
    stop_server,
)
from sft_core.config_loader import find_config_dir, load_config
from sft_core.errors import exception_chain, user_error_in
from sft_core.preflight import check_run_config, preflight
from sft_core.secrets import move_secrets_to_env
from sft_core.tracking.mlflow_tracker import is_tracking_server, lost_tracking_server

EXIT_LOST_SERVER = 75  # sysexits' EX_TEMPFAIL: the run can be started again as it is


def _server_then_ray() -> None:
    """The Prefect server (reused or started), then Ray's start in the background."""
    t0 = time.perf_counter()
    api_url, started = ensure_server()
    elsewhere = started and f":{DEFAULT_PORT}/" not in api_url
    print(
        f"Prefect server: {api_url} ({'started' if started else 'reused'} in {time.perf_counter() - t0:.1f}s"
        + (f"; port {DEFAULT_PORT} is another program's)" if elsewhere else ")")
    )
    from flows.ray_start import begin_local_start

    begin_local_start()


def run(config_name: str, overrides: list[str], config_path: str | None) -> dict[str, Any]:
    set_local_defaults()
    # A secret typed on the command line goes to the environment; the flow run's stored parameters
    # hold only a ${oc.env:...} reference to it.
    overrides = move_secrets_to_env(overrides, os.environ)
    cfg = load_config(config_name, overrides, config_path)
    if cfg.ray_address:
        os.environ["RAY_ADDRESS"] = cfg.ray_address  # read when the flow's task runner starts
    # The checks first: a bad config starts no server and no Ray (a Ray stopped mid-start leaves its
    # agents running). Then Ray starts in the background as soon as the server's URL is known (its
    # processes inherit it) and comes up while the flow is imported and its run created; the flow's
    # task runner takes it over.
    check_run_config(cfg)  # the flow's own check then finds this config checked
    _server_then_ray()
    try:
        from flows.sft_pipeline import sft_pipeline

        # Stored with the flow run, so a retry started from another folder (`prefect flow-run retry`,
        # the UI) reads the same config and files and finds the same run folder.
        return sft_pipeline(
            config_name=config_name,
            overrides=overrides,
            config_path=str(find_config_dir(config_path)) if config_path else None,
            working_dir=os.getcwd(),
        )
    finally:
        from flows.ray_start import discard_early_start

        discard_early_start()  # stopped before the flow took Ray over (Ctrl-C, an import error)


def preview(args: argparse.Namespace) -> None:
    """Encode the first samples exactly as a run would (no server, no Ray) and print them."""
    from sft_core.data.preview import encode_preview, preview_lines, skipped_summary
    from sft_core.data.spec import EncodeSpec
    from sft_core.model.resolve import load_tokenizer, resolve_pretrained

    cfg = load_config(args.config_name, args.overrides, args.config_path)
    preflight(cfg)
    tokenizer = load_tokenizer(resolve_pretrained(cfg.pretrain))
    samples, stats = encode_preview(cfg, tokenizer, args.n, args.split)
    for line in preview_lines(cfg, tokenizer, samples, args.json, color=sys.stdout.isatty()):
        print(line)
    for line in skipped_summary(stats, EncodeSpec.from_config(cfg, args.split).fields):
        print(line, file=sys.stderr)  # stderr: --json output stays one sample per line


def stop_signal(err: BaseException) -> signal.Signals | None:
    """The signal behind a stop from outside: Ctrl-C, or a SIGTERM (also the one `prefect flow-run cancel`
    sends, flows/cancel_watch.py) that Prefect raised as its TerminationSignal."""
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    from prefect.exceptions import TerminationSignal  # loaded already when a flow ran

    return signal.Signals(err.signal) if isinstance(err, TerminationSignal) else None


def print_summary(result: dict[str, Any], wall: float) -> None:
    ui = os.environ.get("PREFECT_API_URL", "").removesuffix("/api")
    uri = result["mlflow_tracking_uri"]
    mlflow_ui = (
        f"{uri}   (the tracking server's own UI)"
        if is_tracking_server(uri)
        else f"mlflow ui --backend-store-uri {shlex.quote(uri)} --port 5000   then http://127.0.0.1:5000"
    )
    name, version = result["registered_model"], result["model_version"]
    # No version: the run started from another output_dir's checkpoint, which already completed it.
    registered = (
        f"{name} version {version} (models:/{name}/{version})"
        if version is not None
        else f"{name}: no version in this registry (the checkpoint started from already completes the run)"
    )
    # The commands paste as they are: paths quoted for the shell, the checkpoint as a Python literal.
    print(
        textwrap.dedent(f"""
        ==== sft-pipeline: '{result["exp_name"]}' finished in {wall:.0f}s ({result["total_steps"]} steps)
        Checkpoint (Hugging Face folder):
          {result["final_checkpoint"]}
          load it: AutoModelForCausalLM.from_pretrained({result["final_checkpoint"]!r})
        MLflow:
          tracking URI      {uri}
          run               {result["mlflow_run_id"]} (experiment {result["mlflow_experiment_id"]})
          registered model  {registered}
          open the UI       {mlflow_ui}
        Prefect:
          flow run          {ui}/runs/flow-run/{result["flow_run_id"]}
          the server keeps running for the UI; stop it with `sft server stop`
        TensorBoard:
          tensorboard --logdir {shlex.quote(result["tensorboard_dir"])}
    """)
    )


def count(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sft", description="Supervised fine-tuning pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the SFT pipeline flow")
    run_p.add_argument(
        "--config-path",
        "--config_path",
        dest="config_path",
        default=None,
        help="config directory (default: the repo's conf/)",
    )
    run_p.add_argument("--config-name", "--config_name", dest="config_name", default="sft_config")
    run_p.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="sweep: one run per combination of key=a,b / range() / choice() values (flows/sweep.py)",
    )
    run_p.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. sft_train.training_args.max_steps=5"
    )
    prev_p = sub.add_parser("preview", help="show encoded samples with the supervised spans marked")
    prev_p.add_argument("--config-path", "--config_path", dest="config_path", default=None)
    prev_p.add_argument("--config-name", "--config_name", dest="config_name", default="sft_config")
    prev_p.add_argument("-n", type=count, default=3, help="how many samples")
    prev_p.add_argument("--split", choices=["train", "validation"], default="train")
    prev_p.add_argument(
        "--json", action="store_true", help="one JSON object per sample (per packed row if packing)"
    )
    prev_p.add_argument("overrides", nargs="*")
    server_p = sub.add_parser("server", help="manage the local Prefect server")
    server_p.add_argument("action", choices=["start", "stop"])
    # Overrides may come before or after the options (`sft preview key=v -n 2 other=w`).
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]

    if args.command == "server":
        set_local_defaults()
        if args.action == "stop":
            print("stopped" if stop_server() else "no server started by sft is running")
            return 0
        try:
            api_url, started = ensure_server()
        except PrefectServerError as err:
            print(f"sft: error: {err}", file=sys.stderr)
            return 1
        print(f"{'started' if started else 'already running'}: {api_url.removesuffix('/api')}")
        return 0
    try:
        if args.command == "preview":
            preview(args)
            return 0
        if args.multirun:
            from flows.sweep import run_sweep

            return run_sweep(args.overrides, args.config_name, args.config_path)
        t0 = time.perf_counter()
        from flows.cancel_watch import sigterm_outside_the_flow

        signal.signal(signal.SIGTERM, sigterm_outside_the_flow)
        faulthandler.enable()  # a native crash in this process prints its Python stack
        result = run(args.config_name, args.overrides, args.config_path)
    except Exception as exc:
        user = user_error_in(exc)
        if user is None and (lost := lost_prefect_api(exc)) is not None:
            print(f"\nsft: error: the Prefect server ({os.environ.get('PREFECT_API_URL')}) stopped answering "
                  f"({type(lost).__name__}: {lost}), so the run stopped; its MLflow run is FAILED. Start "
                  "the run again with resume_from_checkpoint=auto: it continues from the newest "
                  "checkpoint and sets the interrupted flow run to Crashed.", file=sys.stderr)  # fmt: skip
            return EXIT_LOST_SERVER
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if user is None and (lost := lost_tracking_server(exc, tracking_uri)) is not None:
            print(f"\nsft: error: the MLflow tracking server ({tracking_uri}) stopped answering "
                  f"({type(lost).__name__}: {lost}), so the run stopped; its MLflow run could not be "
                  "ended and shows RUNNING. When the server answers again, start the run again with "
                  "resume_from_checkpoint=auto: it continues from the newest checkpoint in the same "
                  "MLflow run.", file=sys.stderr)  # fmt: skip
            return EXIT_LOST_SERVER
        if user is None and (failure := _worker_failure(exc)) is not None:
            print(f"\nsft: error: {failure}\nThe run stopped (after the restarts sft_train.max_restarts "
                  "allows); its MLflow run is FAILED. Once the cause is gone, resume_from_checkpoint=auto "
                  "continues from the newest checkpoint.", file=sys.stderr)  # fmt: skip
            return 1
        if user is None:
            raise  # a bug, not a user mistake: keep the traceback
        print(f"\nsft: error: {user}", file=sys.stderr)
        return user.exit_code
    except BaseException as stop:
        signum = stop_signal(stop)
        if signum is None:
            raise
        # The flow has already killed the actors, closed the MLflow run KILLED, freed the run folder.
        print(f"\nsft: stopped by {signum.name}; resume_from_checkpoint=auto continues from the run's "
              "last checkpoint", file=sys.stderr)  # fmt: skip
        return 128 + signum
    print_summary(result, time.perf_counter() - t0)
    write_result_for_sweep(result)
    return 0


def _worker_failure(exc: BaseException) -> BaseException | None:
    """The WorkerFailure (a worker died or froze) behind `exc`: its message names the rank, the step
    and why, so a traceback of the driver adds nothing."""
    from sft_core.cluster.cluster import WorkerFailure

    return next((e for e in exception_chain(exc) if isinstance(e, WorkerFailure)), None)


def write_result_for_sweep(result: dict[str, Any]) -> None:
    """A run started by `sft run --multirun` leaves what the sweep's summary shows in the file it names."""
    from flows.sweep import RESULT_FILE_ENV

    if path := os.environ.get(RESULT_FILE_ENV):
        keep = ("registered_model", "model_version", "run_folder", "last_metric")
        with open(path, "w") as f:
            json.dump({k: result[k] for k in keep}, f)


def entry() -> NoReturn:
    """The `sft` command: `main()`, then an exit without the interpreter's own teardown. What must
    happen at exit still does (other threads finish, atexit handlers: Ray's shutdown, Prefect's
    log and event flush, logging); only the freeing of every module and object is skipped, which
    takes ~2 s once torch, Ray, Prefect and MLflow are loaded. An exception exits the usual way."""
    code = main()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> NoReturn:
    """The atexit handlers, flushed output, then the exit, skipping the interpreter's freeing of
    every module (also the test session's end: tests/conftest.py)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
