"""MLflow: one run per training run, metrics per logging_steps, checkpoints as registered versions.

The tracking URI honours MLFLOW_TRACKING_URI; by default it is a sqlite database under the run's
output_dir, so the MLflow UI can be opened on it with `mlflow ui --backend-store-uri <uri>`.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import quote as percent_quote
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from sft_core.errors import exception_chain
from sft_core.tracking import flatten
from sft_core.tracking.mlflow_store import registry_lock, seed_sqlite, sqlite_path

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException


P = ParamSpec("P")
R = TypeVar("R")


class _WriteThread:
    """One thread that runs this process's MLflow writes in order. A daemon: it never holds the
    process open (`sft` joins every other thread before it exits), and the writes queued when the
    process ends are waited for at exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pid: int | None = None
        self.local = threading.local()  # .active: this thread is the write thread

    def submit(self, fn: Callable[[], R]) -> Future[R]:
        future: Future[R] = Future()
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child (it has no such thread)
                threading.Thread(target=self._serve, name="mlflow-write", daemon=True).start()
                self._pid = os.getpid()
        self._jobs.put((fn, future))
        return future

    def _serve(self) -> None:
        self.local.active = True
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as err:  # the caller gets it, this thread goes on
                future.set_exception(err)

    def drain(self, timeout: float = 120.0) -> None:
        """Wait for the writes queued so far (at exit: a stop's caller may have left one running)."""
        if self._pid == os.getpid():
            with contextlib.suppress(TimeoutError):
                self.submit(lambda: None).result(timeout)


_writes = _WriteThread()
atexit.register(_writes.drain)


def write_whole(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run `fn` (an MLflow write, or one that must not stop half-way) on the process's MLflow write
    thread and wait for it.

    A stop (Ctrl-C's KeyboardInterrupt, a cancel's SIGTERM that Prefect raises as its
    TerminationSignal) is raised by Python in the main thread, wherever it is. Raised inside
    SQLAlchemy's commit it leaves sqlite's write lock held by a transaction this process never ends:
    a version half-made, and the stop itself unable to end the run KILLED ("database is locked").
    Here it lands in the wait instead: the write finishes on its own thread, and the stop's
    `close("KILLED")` queues behind it on the same thread. No signal handler is touched (Prefect
    commits a cancel only while its own SIGTERM handler is installed; it checks by identity).
    Writes made from the write thread itself (one inside another) run in place."""
    if getattr(_writes.local, "active", False):
        return fn(*args, **kwargs)
    context = contextvars.copy_context()  # Prefect's run context (get_run_logger) goes along
    return _writes.submit(functools.partial(context.run, fn, *args, **kwargs)).result()


def uninterrupted(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` (an MLflow write) runs whole on the write thread (write_whole)."""

    @functools.wraps(fn)
    def whole(*args: P.args, **kwargs: P.kwargs) -> R:
        return write_whole(fn, *args, **kwargs)

    return whole


def default_tracking_uri(output_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(Path(output_dir) / "mlflow" / "mlflow.db")


def sqlite_uri(path: Path) -> str:
    """The URI of a sqlite database at `path`. SQLAlchemy ends the path at a '?' (its query) and
    decodes %XX in it: such a path is percent-quoted (MLflow then also makes an empty folder named as
    the URI spells it, beside the real one); any other path is written as it is.

    >>> sqlite_uri(Path("/out/q?v=1/m.db")), sqlite_uri(Path("/out/100% #1/m.db"))
    ('sqlite:////out/q%3Fv%3D1/m.db', 'sqlite:////out/100% #1/m.db')
    """
    text = str(path)
    return f"sqlite:///{percent_quote(text) if '?' in text or unquote(text) != text else text}"


def is_tracking_server(tracking_uri: str) -> bool:
    """A tracking server (http, https, databricks), as opposed to a store this process opens itself
    (sqlite, a folder). A server keeps artifacts in its own store and, for a model version, accepts
    only a source inside that store."""
    return urlparse(tracking_uri).scheme in ("http", "https", "databricks") or tracking_uri == "databricks"


def lost_tracking_server(err: BaseException | None, tracking_uri: str) -> BaseException | None:
    """The connection failure behind `err` when it is the tracking server at `tracking_uri` that
    stopped answering (after MLflow's own retries); None for anything else, a local store included."""
    import requests

    if not is_tracking_server(tracking_uri):
        return None
    server = urlparse(tracking_uri)
    for failure in exception_chain(err):
        if isinstance(failure, requests.ConnectionError | requests.Timeout) and failure.request is not None:
            url = urlparse(failure.request.url or "")
            if (url.scheme, url.netloc) == (server.scheme, server.netloc):
                return failure
    return None


class MLflowTracker:
    """The run's MLflow run; every write is made whole (`uninterrupted`)."""

    @uninterrupted
    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_dir: str,
        run_name: str,
        tags: dict[str, str],
        resume_run_id: str | None = None,
        resume_step: int = 0,
    ):
        self.tracking_uri = tracking_uri
        self.client = _client(tracking_uri)
        # A local store keeps artifacts beside the run's outputs; a server, where it is configured to.
        location = None if is_tracking_server(tracking_uri) else Path(artifact_dir).as_uri()
        self.experiment_id = self._experiment(experiment, location)
        self._already_logged: set[tuple[str, int]] = set()
        self._resumed = bool(resume_run_id)
        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self.continue_after(resume_step)
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

    def _experiment(self, name: str, location: str | None) -> str:
        """The experiment's id, created if missing; by another run started at the same moment too."""
        from mlflow.exceptions import MlflowException

        if exp := self.client.get_experiment_by_name(name):
            return str(exp.experiment_id)
        try:
            return str(self.client.create_experiment(name, artifact_location=location))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS" or not (
                exp := self.client.get_experiment_by_name(name)
            ):
                raise
            return str(exp.experiment_id)

    @uninterrupted
    def continue_after(self, step: int) -> None:
        """Continuing from the checkpoint at `step`. Steps after it that an earlier attempt logged
        are redone: in a local sqlite store their points are removed, so the run shows the values
        of the attempt that trained them (another value where the resume changed an allowed
        setting: the schedule, the worker count). A tracking server offers no way to remove points:
        there the earlier values stay. A retried flow run logs again what came before the
        checkpoint (the data metrics at step 0): a (key, step) the run already has is never logged
        twice."""
        if (db := sqlite_path(self.tracking_uri)) is not None:
            _forget_steps_after(db, self.run_id, step)
        self._already_logged = {
            (key, m.step)
            for key in self.client.get_run(self.run_id).data.metrics
            for m in self.client.get_metric_history(self.run_id, key)
        }

    @uninterrupted
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self._resumed:
            return  # params are immutable in MLflow; the resumed run already has them

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @uninterrupted
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        fresh = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if (k, step) not in self._already_logged
        ]
        if fresh:
            self.client.log_batch(self.run_id, metrics=fresh)

    @uninterrupted
    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _forget_steps_after(db: Path, run_id: str, step: int) -> None:
    """Remove a run's metric points after `step` from MLflow's sqlite store, and make each key's
    latest value (MLflow's own table) the newest point left: by step, then time, then value, as
    MLflow orders them."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn, conn:
        conn.execute("DELETE FROM metrics WHERE run_uuid = ? AND step > ?", (run_id, step))
        conn.execute("DELETE FROM latest_metrics WHERE run_uuid = ?", (run_id,))
        conn.execute(
            """INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid)
               SELECT key, value, timestamp, step, is_nan, run_uuid FROM (
                 SELECT *, ROW_NUMBER() OVER (
                   PARTITION BY key ORDER BY step DESC, timestamp DESC, value DESC) AS newest
                 FROM metrics WHERE run_uuid = ?)
               WHERE newest = 1""",
            (run_id,),
        )


@uninterrupted
def fail_if_running(tracking_uri: str, run_id: str, why: str) -> bool:
    """End a run its process can no longer end (killed) as FAILED, with `why` in the tag
    sft.failure; a run in any other state is left alone. Returns whether it was changed."""
    client = _client(tracking_uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, "sft.failure", why)
    client.set_terminated(run_id, status="FAILED")
    return True


# The tag naming what a version's best_metric was measured on (a digest of the encoded data):
# versions with different values are not ranked against each other.
METRIC_DATA_TAG = "metric_data"


@dataclass(frozen=True)
class RegisteredVersion:
    version: int
    is_best: bool
    note: str = ""  # why `best` moved without a comparison, for the log
    best_stays: str = ""  # where `best` stays when this version does not beat it, for the log


def _not_found(err: MlflowException) -> bool:
    """A registry lookup that found nothing (no such model, no such alias yet), as opposed to one
    that failed (a tracking server that stopped answering: MLflow raises the same class)."""
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _client(tracking_uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    seed_sqlite(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@uninterrupted
def register_checkpoint(
    tracking_uri: str,
    model_name: str,
    checkpoint_dir: str,
    run_id: str,
    step: int,
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
    description: str = "",
    best_metric: str = "val_loss",
    greater_is_better: bool = False,
) -> RegisteredVersion:
    """Register a checkpoint folder as a new version of `model_name`.

    With a local store the version's source is the checkpoint folder itself (no copy of the weights;
    its MLmodel makes it loadable by mlflow.transformers / pyfunc). A tracking server refuses a
    source outside its artifact store (and other hosts could not read one): the folder is uploaded
    as the run's artifacts `checkpoints/checkpoint-<step>` first, and the version's source is
    that. MLflow 3 reserves the alias `latest` and resolves
    `models:/<name>@latest` to the newest version by itself; we set `last_saved` on every version and
    move `best` only when `best_metric` improves on the version `best` points at now, across runs.
    """
    # A stop between the version and its aliases would leave it half-made: it waits (uninterrupted).
    # Another process's registration between reading `best` and moving it would be lost: locked.
    from mlflow.exceptions import MlflowException

    with registry_lock(tracking_uri):
        client = _client(tracking_uri)
        try:
            client.get_registered_model(model_name)
        except MlflowException as err:
            if not _not_found(err):
                raise
            client.create_registered_model(model_name, description=description)
        all_tags = {"global_step": str(step), **{k: f"{v:.6g}" for k, v in metrics.items()}, **(tags or {})}
        # A retried registration (the task's retries, a flow retry) takes the version it made before.
        version = checkpoint_version(tracking_uri, model_name, checkpoint_dir, run_id, step)
        if version is None:
            if is_tracking_server(tracking_uri):
                # Uploaded whole before the version exists (a retry uploads the same files again).
                client.log_artifacts(run_id, checkpoint_dir, f"checkpoints/checkpoint-{step}")
                all_tags["checkpoint_dir"] = checkpoint_dir  # where it came from, for the reader
            version = int(client.create_model_version(
                model_name,
                source=version_source(tracking_uri, checkpoint_dir, run_id, step),
                run_id=run_id,
                tags=all_tags,
                description=f"checkpoint at global step {step}",
            ).version)  # fmt: skip
        if description:
            client.update_registered_model(model_name, description=description)
        client.set_registered_model_alias(model_name, "last_saved", str(version))
        value = metrics.get(best_metric)
        is_best, note = False, ""
        if value is not None:
            try:
                best = client.get_model_version_by_alias(model_name, "best")
            except MlflowException as err:
                if not _not_found(err):
                    raise  # a failed read is not "no best yet": that would move it to a worse version
                best = None
            current = best.tags.get(best_metric) if best else None
            # A version tagged with other data than `best` was measured on another basis (another
            # validation set: a retraining on new data): the two cannot be ranked, and the newer
            # basis wins. A version without the tag (older code) is compared as before.
            basis = all_tags.get(METRIC_DATA_TAG)
            if best and current is not None and basis and best.tags.get(METRIC_DATA_TAG) not in (None, basis):
                note = (
                    f"'best' moved from version {best.version} to {version} without a comparison: its "
                    f"{best_metric} {current} was measured on other data ({METRIC_DATA_TAG} "
                    f"{best.tags[METRIC_DATA_TAG]}, now {basis}), so the two cannot be ranked"
                )
            tagged = float(all_tags[best_metric])  # compared as the tags hold it: an equal tag is a tie
            better = (
                current is None
                or bool(note)
                or (tagged > float(current) if greater_is_better else tagged < float(current))
            )  # ties keep the earlier version
            if better:
                client.set_registered_model_alias(model_name, "best", str(version))
                is_best = True
            elif best:
                stays = f"version {best.version} ({best_metric} {current}; this one {all_tags[best_metric]})"
                return RegisteredVersion(version, False, note, stays)
        return RegisteredVersion(version, is_best, note)


def version_source(tracking_uri: str, checkpoint_dir: str, run_id: str, step: int) -> str:
    """The source a checkpoint's version has: the folder itself in a local store; in a tracking
    server, the copy uploaded as the run's artifacts."""
    if is_tracking_server(tracking_uri):
        return f"runs:/{run_id}/checkpoints/checkpoint-{step}"
    return Path(checkpoint_dir).as_uri()


def checkpoint_version(
    tracking_uri: str, model_name: str, checkpoint_dir: str, run_id: str, step: int
) -> int | None:
    """The version the run registered for this checkpoint, if it did."""
    from mlflow.exceptions import MlflowException

    source = version_source(tracking_uri, checkpoint_dir, run_id, step)
    try:
        versions = _client(tracking_uri).search_model_versions(name_filter(model_name))
    except MlflowException as err:
        if not _not_found(err):
            raise
        return None
    return next((int(v.version) for v in versions if v.source == source and v.run_id == run_id), None)


def source_path(source: str | None) -> Path | None:
    """The local folder a version's `file://` source names, percent-decoded as `as_uri` encoded it.

    >>> source_path("file:///out/my%20runs/checkpoint-2/sft_train"), source_path("s3://b/k")
    (PosixPath('/out/my runs/checkpoint-2/sft_train'), None)
    """
    parsed = urlparse(source or "")
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else None


def name_filter(model_name: str) -> str:
    """An MLflow search filter for one registered model. Its grammar has no escape for quotes: the
    name is quoted with the kind it does not contain (the config refuses names with both)."""
    for quote in ("'", '"'):
        if quote not in model_name:
            return f"name={quote}{model_name}{quote}"
    raise ValueError(
        f"the registered model name {model_name!r} holds both ' and \", which an MLflow search cannot "
        "quote; choose an exp_name without one of them"
    )


def best_version_source(tracking_uri: str, model_name: str) -> str | None:
    """The local folder the `best` alias points at, if any."""
    from mlflow.exceptions import MlflowException

    try:
        mv = _client(tracking_uri).get_model_version_by_alias(model_name, "best")
    except MlflowException as err:
        if not _not_found(err):
            raise
        return None
    path = source_path(mv.source)
    return str(path) if path is not None else None


def versions_by_folder(
    tracking_uri: str, model_name: str, folders: Iterable[str | Path]
) -> dict[Path, list[int]]:
    """For each folder, the registered versions whose source is it or a folder inside it (one query)."""
    versions = _client(tracking_uri).search_model_versions(name_filter(model_name))
    found = [(int(v.version), p.resolve()) for v in versions if (p := source_path(v.source)) is not None]
    wanted = {Path(f): Path(f).resolve() for f in folders}
    return {f: sorted(n for n, p in found if p.is_relative_to(r)) for f, r in wanted.items()}


def versions_for_source(tracking_uri: str, model_name: str, folder: str) -> list[int]:
    """Registered versions whose source is `folder` (or a folder inside it)."""
    return versions_by_folder(tracking_uri, model_name, [folder])[Path(folder)]


@uninterrupted
def delete_versions(tracking_uri: str, model_name: str, versions: list[int]) -> None:
    client = _client(tracking_uri)
    for v in versions:
        client.delete_model_version(model_name, str(v))
