"""A cancel (`prefect flow-run cancel`, the UI's Cancel) that reaches the run whoever started it.

Prefect delivers a cancel through the process that started the flow run: a worker or runner sees the
run Cancelling, tells the engine it is a cancel, then sends SIGTERM. Two cases go without:
- `sft run` calls the flow in its own process, which no worker or runner watches: the run stayed
  Cancelling while it trained on.
- A worker that misses the cancel (hung, or its event stream lost the Cancelling event: seen twice
  in CI) leaves the run training, and registering versions, after the user pressed Cancel.

Here a thread of the flow's process watches the run's state. Once it is Cancelling, it does what a
runner does (commits the engine's cancel intent, sends SIGTERM to this process): at once in a
process nobody else watches, and after `SFT_CANCEL_BACKSTOP_S` (default 30 s) in a worker's, if the
worker has not delivered the cancel by then. The flow then stops as a worker's cancel stops it
(actors killed, MLflow run KILLED, run folder free to resume) and the run ends Cancelled.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

POLL_S = 2.0  # how often the run's state is read: one small API call
BACKSTOP_S = 30.0  # how long a worker gets to deliver a cancel itself (it takes ~1-3 s)

logger = logging.getLogger(__name__)


@contextmanager
def cancel_from_the_server(flow_run_id: str, poll_s: float = POLL_S) -> Iterator[None]:
    """Watch `flow_run_id` for a cancel while the block runs (in the main thread, where SIGTERM
    is handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # PREFECT__FLOW_RUN_ID: a worker or runner started this process and delivers cancels itself.
    by_runner = bool(os.environ.get("PREFECT__FLOW_RUN_ID"))
    wait_s = float(os.environ.get("SFT_CANCEL_BACKSTOP_S", BACKSTOP_S)) if by_runner else 0.0
    stop, fired = threading.Event(), threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(flow_run_id, poll_s, wait_s, stop, fired, _run_logger()), name="sft-cancel-watch",
        daemon=True,
    )  # fmt: skip
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        # In a worker's process the engine leaves the final state to the worker, which missed this
        # cancel: the run's cleanup is done (the block has unwound), so the watch ends it Cancelled.
        if fired.is_set() and by_runner:
            _set_cancelled(flow_run_id)


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger (its lines reach the UI), taken in the flow's thread; else this module's."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def _watch(
    flow_run_id: str,
    poll_s: float,
    wait_s: float,
    stop: threading.Event,
    fired: threading.Event,
    log: logging.Logger | logging.LoggerAdapter,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    try:
        client = get_client(sync_client=True)
    except Exception as err:  # no API to watch: the run goes on, stoppable by Ctrl-C or SIGTERM
        log.warning("cannot watch flow run %s for a cancel: %s", flow_run_id, err)
        return
    cancelling_since: float | None = None
    with client:
        while not stop.wait(poll_s):
            try:
                state = client.read_flow_run(flow_run_id).state  # type: ignore[arg-type]
            except Exception as err:  # the server restarting: try again next time
                log.debug("cancel watch: reading flow run %s failed: %s", flow_run_id, err)
                continue
            if state is None or state.type != StateType.CANCELLING:
                cancelling_since = None
                continue
            cancelling_since = cancelling_since or time.monotonic()
            if time.monotonic() - cancelling_since < wait_s or _delivered() or stop.is_set():
                continue
            if wait_s:
                log.warning(
                    "flow run %s has been Cancelling for %.0f s and its worker has not stopped it; "
                    "stopping it from inside (SFT_CANCEL_BACKSTOP_S)", flow_run_id, wait_s,
                )  # fmt: skip
            fired.set()
            _cancel_this_process(log)
            return


def _delivered() -> bool:
    """Whether a runner has already committed a cancel (or other control intent) to this process."""
    try:
        from prefect._internal import control_listener
    except ImportError:
        return False
    return control_listener.get_intent() is not None


def _cancel_this_process(log: logging.Logger | logging.LoggerAdapter) -> None:
    """As a runner cancels: the engine's cancel intent (so it ends the run Cancelled, not Crashed),
    then SIGTERM, which Prefect's handler raises in the main thread wherever it is."""
    try:
        from prefect._internal import control_listener
        from prefect.utilities.engine import commit_control_intent_and_ack

        committed = commit_control_intent_and_ack(
            commit_intent=lambda: control_listener._set_intent("cancel"),
            clear_intent=control_listener.clear_intent,
            send_ack=lambda: None,  # no runner to acknowledge to
        )
    except ImportError:  # private API moved: the stop still happens, the run then ends Crashed
        committed = False
    if not committed:
        log.warning("the flow run was cancelled; stopping it (it will show Crashed, not Cancelled)")
    os.kill(os.getpid(), signal.SIGTERM)


_stopping = False


def ignore_further_sigterm() -> None:
    """Called once a stop is under way. A second SIGTERM (a worker delivering a cancel after the
    backstop fired, an operator's second `kill`) would interrupt the cleanup that ends the MLflow run
    KILLED and frees the run folder; from here it is ignored. The worker's SIGKILL after its grace
    period, and Ctrl-C, still end the process."""
    global _stopping
    _stopping = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def sigterm_outside_the_flow(signum: int, frame: object) -> None:
    """SIGTERM's handler in `sft run` around the flow engine, which installs its own while the flow
    runs and puts this one back when the flow ends, before the run's end is reported and Ray is shut
    down. A SIGTERM there during a stop is ignored (the default action would kill the process with
    its flow run still Running); otherwise it exits as a SIGTERM does, through the normal exit."""
    if not _stopping:
        raise SystemExit(128 + signum)


def _set_cancelled(flow_run_id: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelled(message="Flow run was cancelled."), force=True)
    except Exception as err:
        _run_logger().warning("could not set flow run %s Cancelled: %s", flow_run_id, err)
