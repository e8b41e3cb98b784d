"""A new sqlite tracking database starts as a copy of an empty, migrated one.

MLflow creates a sqlite database by running all of its schema migrations, about 3 CPU-seconds here,
which every new output_dir used to pay. The first one made is kept, emptied, under sft_home (one per
MLflow version); later databases are a file copy. The copy holds no experiment: MLflow adds its
Default experiment, with this store's own artifact root, when it first opens it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

from sft_core.home import mlflow_templates

_SQLITE = "sqlite:///"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a `sqlite:///<path>` URI (relative to the working directory unless absolute),
    percent-decoded as SQLAlchemy decodes it; None for any other store, in-memory databases and
    URIs with query options."""
    if not tracking_uri.startswith(_SQLITE):
        return None
    rest = tracking_uri.removeprefix(_SQLITE)
    if not rest or rest == ":memory:" or "?" in rest:
        return None
    return Path(unquote(rest))


@contextlib.contextmanager
def registry_lock(tracking_uri: str, wait_s: float = 300.0) -> Iterator[None]:
    """One registration at a time across the processes of this host that use one sqlite store.
    Moving `best` reads the version it points at, then sets the alias: another run's registration
    falling between the two would have its better version lose `best` to a worse one. The lock is
    a file beside the database (`<db>.registry.lock`, holding the holder's pid). A holder that keeps
    it `wait_s` (frozen) is logged and passed over: the registration is not lost. Other stores (a
    tracking server) get no lock."""
    path = sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.registry.lock"), "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    f.seek(0)
                    logging.getLogger(__name__).warning(
                        "%s has been held for %.0f s by process %s; registering without it (a "
                        "concurrent registration could then move `best` out of order)",
                        f.name, wait_s, f.read().strip() or "?",
                    )  # fmt: skip
                    yield
                    return
                time.sleep(0.05)
        try:
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def seed_sqlite(tracking_uri: str) -> None:
    """Put an empty, migrated database where a sqlite tracking URI names one that does not exist yet.
    An existing database is never touched, also one another process creates meanwhile."""
    path = sqlite_path(tracking_uri)
    if path is None or path.exists():
        return
    try:
        template = _template()
    except OSError:
        return  # no writable sft_home: MLflow migrates the new database itself, as it would anyway
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(template, staged)
        os.link(staged, path)  # fails, rather than replaces, if the database appeared meanwhile
    except OSError:
        pass  # it appeared, or no hard links here (some network mounts): MLflow opens or makes it
    finally:
        staged.unlink(missing_ok=True)


def _template() -> Path:
    import mlflow

    template = mlflow_templates() / f"empty-{mlflow.__version__}.db"
    if template.is_file():
        return template
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template.parent.mkdir(parents=True, exist_ok=True)
    staged = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    try:
        store = SqlAlchemyStore(f"{_SQLITE}{staged}", staged.parent.as_uri())  # runs the migrations
        store.engine.dispose()
        with sqlite3.connect(staged) as db:
            tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                if table != "alembic_version":  # the schema's version makes it a migrated database
                    db.execute(f'DELETE FROM "{table}"')
        os.replace(staged, template)
    finally:
        staged.unlink(missing_ok=True)  # a failed attempt leaves nothing behind
    return template
