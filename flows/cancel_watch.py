"""`prefect flow-run cancel` (the API's cancel) for a flow run that no worker or runner started.

Prefect delivers a cancel through the process that started the flow run: a worker or runner sets
the run Cancelling, tells the engine it is a cancel, then sends SIGTERM. `sft run` calls the flow in
its own process, so nothing would deliver it: the run stayed Cancelling while it trained on. Here a
thread of that process watches the run's state and, once it is Cancelling, does what a runner does:
it commits the engine's cancel intent and sends SIGTERM to this process. The flow then stops as a
worker's cancel stops it (actors killed, MLflow run KILLED, run folder free to resume) and the
engine ends the run Cancelled.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

POLL_S = 2.0  # how soon a cancel takes effect; one small API read each time

logger = logging.getLogger(__name__)


@contextmanager
def cancel_from_the_server(flow_run_id: str, poll_s: float = POLL_S) -> Iterator[None]:
    """Watch `flow_run_id` while the block runs, in a process that started its own flow run (no
    PREFECT__FLOW_RUN_ID from a worker or runner, which deliver cancels themselves)."""
    if os.environ.get("PREFECT__FLOW_RUN_ID") or threading.current_thread() is not threading.main_thread():
        yield
        return
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch, args=(flow_run_id, poll_s, stop), name="sft-cancel-watch", daemon=True
    )
    watcher.start()
    try:
        yield
    finally:
        stop.set()


def _watch(flow_run_id: str, poll_s: float, stop: threading.Event) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    try:
        client = get_client(sync_client=True)
    except Exception as err:  # no API to watch: the run goes on, stoppable by Ctrl-C or SIGTERM
        logger.warning("cannot watch flow run %s for a cancel: %s", flow_run_id, err)
        return
    with client:
        while not stop.wait(poll_s):
            try:
                state = client.read_flow_run(flow_run_id).state  # type: ignore[arg-type]
            except Exception as err:  # the server restarting: try again next time
                logger.debug("cancel watch: reading flow run %s failed: %s", flow_run_id, err)
                continue
            if state is not None and state.type == StateType.CANCELLING and not stop.is_set():
                _cancel_this_process()
                return


def _cancel_this_process() -> None:
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
        logger.warning("the flow run was cancelled; stopping it (it will show Crashed, not Cancelled)")
    os.kill(os.getpid(), signal.SIGTERM)
