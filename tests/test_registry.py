"""The registry: `best` moves only on improvement (across runs), `last_saved` always; pruning helpers
find a checkpoint's versions; a registered checkpoint folder is a real MLflow model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sft_core.tracking.mlflow_tracker import (
    METRIC_DATA_TAG,
    MLflowTracker,
    best_version_source,
    delete_versions,
    register_checkpoint,
    versions_for_source,
)
from tests.helpers import wait_for_http


def test_another_process_cannot_register_between_reading_best_and_moving_it(tmp_path):
    """Two runs sharing one store (a sweep, a scheduled retrain beside a manual run): run A reads
    `best` (none yet) and is held there 2 s while run B registers a better version. Unlocked, A then
    set `best` to its worse version; with the registry lock B waits for A and then takes `best`."""
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("e", (tmp_path / "art").as_uri())).info.run_id
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    read = tmp_path / "a-read-best"
    code = (
        "import time\n"
        "from pathlib import Path\n"
        "from mlflow import MlflowClient\n"
        "from sft_core.tracking.mlflow_tracker import register_checkpoint\n"
        "by_alias = MlflowClient.get_model_version_by_alias\n"
        "def held(self, *args, **kwargs):  # A is held right after reading `best`\n"
        "    try:\n"
        "        return by_alias(self, *args, **kwargs)\n"
        "    finally:\n"
        f"        Path({str(read)!r}).touch()\n"
        "        time.sleep(2)\n"
        "MlflowClient.get_model_version_by_alias = held\n"
        f"print(register_checkpoint({uri!r}, 'm', {str(tmp_path / 'a')!r}, {run_id!r}, 1, {{'val_loss': 2.0}}).version)\n"
    )
    a = subprocess.Popen(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not read.exists():
        assert a.poll() is None, a.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b = register_checkpoint(uri, "m", str(tmp_path / "b"), run_id, 2, {"val_loss": 1.0})
    out, err = a.communicate(timeout=120)
    assert a.returncode == 0, err
    assert int(out) == 1 and b.version == 2 and b.is_best
    assert int(client.get_model_version_by_alias("m", "best").version) == 2


@pytest.mark.parametrize("greater_is_better", [False, True])
def test_best_moves_only_when_the_metric_improves(tmp_path, greater_is_better):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    sign = -1 if greater_is_better else 1
    # Two "runs" of three versions each; the metric as it comes, and which version should be best.
    plan = [(1.0, 1), (0.8, 2), (0.9, 2), (0.8, 2), (0.7, 5), (None, 5)]
    runs = [client.create_run(exp).info.run_id for _ in range(2)]
    for i, (metric, best) in enumerate(plan, start=1):
        run = runs[i > 3]
        folder = tmp_path / f"run{1 + (i > 3)}" / f"checkpoint-{i}" / "sft_train"
        folder.mkdir(parents=True)
        metrics = {} if metric is None else {"val_loss": sign * metric}
        got = register_checkpoint(uri, "m", str(folder), run, i, metrics, {"data_fingerprint": "x"},
                                  "desc", "val_loss", greater_is_better)  # fmt: skip
        assert got.version == i and got.is_best == (best == i)
        # A version that does not beat `best` says where it stays (for the log); one without the metric, nothing.
        stays = (
            f"version {best} (val_loss {sign * plan[best - 1][0]:.6g}; this one {sign * metric:.6g})"
            if metric
            else ""
        )
        assert got.best_stays == ("" if best == i else stays)
        assert int(client.get_model_version_by_alias("m", "best").version) == best
        assert int(client.get_model_version_by_alias("m", "last_saved").version) == i
        assert client.get_model_version("m", str(i)).source == folder.as_uri()  # never moved
    assert client.get_registered_model("m").description == "desc"
    assert best_version_source(uri, "m").endswith("run2/checkpoint-5/sft_train")
    assert versions_for_source(uri, "m", str(tmp_path / "run1" / "checkpoint-2")) == [2]
    delete_versions(uri, "m", [2])
    assert versions_for_source(uri, "m", str(tmp_path / "run1" / "checkpoint-2")) == []


def test_best_is_never_ranked_across_different_validation_data(tmp_path):
    """A nightly retraining on a new validation set: its val_loss cannot be compared with the one
    `best` was measured on. The first version measured on the new data takes `best` (saying so),
    and later ones are ranked against it on that data alone."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(
        client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    ).info.run_id
    # (val_loss, the data it was measured on, which version is best after it, moved without a comparison)
    plan = [(1.0, "old", 1, False), (2.0, "new", 2, True), (1.5, "new", 3, False), (1.7, "new", 3, False),
            (0.5, None, 5, False),  # untagged (registered by older code): compared as before
            (0.9, "new", 5, False)]  # fmt: skip
    for i, (loss, data, best, moved) in enumerate(plan, start=1):
        folder = tmp_path / f"checkpoint-{i}" / "sft_train"
        folder.mkdir(parents=True)
        tags = {} if data is None else {METRIC_DATA_TAG: data}
        got = register_checkpoint(uri, "m", str(folder), run, i, {"val_loss": loss}, tags)
        assert (
            got.is_best == (best == i) and int(client.get_model_version_by_alias("m", "best").version) == best
        )
        assert bool(got.note) == moved, got.note
        if moved:
            assert got.note.startswith("'best' moved from version 1 to 2 without a comparison"), got.note
    assert int(client.get_model_version_by_alias("m", "best").version) == 5


def test_a_failed_read_of_best_is_not_taken_for_no_best(tmp_path, monkeypatch):
    """Reading `best` fails (a tracking server's hiccup: MLflow raises the same exception class as
    for an alias not made yet). Taken for "no best", the worse version got `best`; it must fail the
    registration instead, and its retry must take the version made and leave `best` where it was."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("e", (tmp_path / "a").as_uri())).info.run_id
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
    register_checkpoint(uri, "m", str(tmp_path / "checkpoint-1"), run, 1, {"val_loss": 1.0})
    by_alias = MlflowClient.get_model_version_by_alias
    failures = iter([MlflowException("the server answered 503", error_code="TEMPORARILY_UNAVAILABLE")])

    def hiccup(self, *args, **kwargs):
        if (err := next(failures, None)) is not None:
            raise err
        return by_alias(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", hiccup)
    with pytest.raises(MlflowException, match="503"):
        register_checkpoint(uri, "m", str(tmp_path / "checkpoint-2"), run, 2, {"val_loss": 2.0})
    retried = register_checkpoint(uri, "m", str(tmp_path / "checkpoint-2"), run, 2, {"val_loss": 2.0})
    assert (retried.version, retried.is_best) == (2, False)
    assert int(by_alias(client, "m", "best").version) == 1


def test_a_checkpoint_folder_is_a_loadable_mlflow_model_and_stays_a_hf_folder(tmp_path, tiny_model_dir):
    import mlflow.pyfunc
    import mlflow.transformers
    from transformers import AutoModelForCausalLM

    from sft_core.tracking.mlflow_model import write_mlflow_model

    folder = tmp_path / "sft_train"
    shutil.copytree(tiny_model_dir, folder)
    weights = {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}
    write_mlflow_model(folder)
    assert {p.name: p.stat().st_size for p in folder.rglob("*.safetensors")} == weights  # no copy
    pipe = mlflow.transformers.load_model(str(folder))
    assert pipe("Hello", max_new_tokens=2)[0]["generated_text"].startswith("Hello")
    assert isinstance(mlflow.pyfunc.load_model(str(folder)).predict(["Hi"])[0], str)
    AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.slow
def test_a_registered_version_is_served_by_mlflow_models_serve(tmp_path, tiny_model_dir):
    import json
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from mlflow import MlflowClient

    from flows.runtime import free_port, stop_process_group
    from sft_core.tracking.mlflow_model import write_mlflow_model

    folder = tmp_path / "run" / "checkpoint-1" / "sft_train"
    shutil.copytree(tiny_model_dir, folder)
    write_mlflow_model(folder)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    register_checkpoint(
        uri, "served", str(folder), run.info.run_id, 1, {"val_loss": 1.0}, {}, "d", "val_loss", False
    )

    port = free_port()
    # mlflow starts `uvicorn` through the shell: the venv's scripts must be on PATH (as in an
    # activated venv; `make test` runs pytest without activating it).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served@best", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, lambda: server.stderr.read().decode())
        body = json.dumps({"inputs": ["Hello"], "params": {"max_new_tokens": 2}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 1 and isinstance(predictions[0], str) and predictions[0]
    finally:
        stop_process_group(server.pid)


def test_a_new_tracking_database_is_a_copy_of_an_empty_migrated_one(tmp_path, monkeypatch):
    """The seeded database has MLflow's own schema, no experiment but the Default one MLflow adds
    with this store's artifact root, works for runs and the registry, and an existing database is
    never replaced."""
    import sqlite3

    import mlflow
    from mlflow import MlflowClient

    from sft_core.tracking.mlflow_store import seed_sqlite, sqlite_path
    from sft_core.tracking.mlflow_tracker import MLflowTracker

    monkeypatch.setenv("SFT_HOME", str(tmp_path / "home"))  # a template made by this test
    monkeypatch.chdir(tmp_path)
    by_mlflow, seeded = tmp_path / "by-mlflow.db", tmp_path / "out" / "mlflow" / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{by_mlflow}").search_experiments()  # MLflow migrates it

    def schema(db):
        """Every table and index with the clauses of its SQL, in any order: MLflow's migrations that
        recreate a table list its CHECK constraints in an order that varies from one migration to
        the next (seen: two databases migrated in one process)."""
        with sqlite3.connect(db) as c:
            rows = c.execute("SELECT type, name, sql FROM sqlite_master").fetchall()
            version = c.execute("SELECT version_num FROM alembic_version").fetchall()
        clauses = {
            (t, n, frozenset(ln.strip().rstrip(",") for ln in (sql or "").splitlines())) for t, n, sql in rows
        }
        return clauses, version

    uri = f"sqlite:///{seeded}"
    tracker = MLflowTracker(uri, "exp", str(tmp_path / "art"), "run", {"k": "v"})
    assert [t.name for t in (tmp_path / "home" / "mlflow").iterdir()] == [f"empty-{mlflow.__version__}.db"]
    assert schema(seeded) == schema(by_mlflow)
    client = MlflowClient(tracking_uri=uri)
    experiments = {e.name: e for e in client.search_experiments()}
    assert sorted(experiments) == ["Default", "exp"]
    assert experiments["Default"].artifact_location == str(tmp_path / "mlruns" / "0")
    tracker.log_metrics({"loss": 1.5}, step=1)
    tracker.close()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert register_checkpoint(uri, "m", str(folder), tracker.run_id, 1, {"val_loss": 1.0}, {}, "d",
                               "val_loss", False).version == 1  # fmt: skip

    before = seeded.read_bytes()
    seed_sqlite(uri)
    assert seeded.read_bytes() == before  # an existing database is left as it is
    MLflowTracker(uri, "exp", str(tmp_path / "art"), "run2", {})
    assert [r.info.run_name for r in client.search_runs([experiments["exp"].experiment_id])] == [
        "run2",
        "run",
    ]
    assert client.get_metric_history(tracker.run_id, "loss")[0].value == 1.5
    assert not list(seeded.parent.glob(".*.tmp"))

    assert sqlite_path("sqlite:///rel/m.db") == Path("rel/m.db")
    assert sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    for other in ("sqlite:///:memory:", "sqlite://", "postgresql://h/db", "http://127.0.0.1:5000",
                  "sqlite:///m.db?mode=ro"):  # fmt: skip
        assert sqlite_path(other) is None


def test_a_new_tracking_database_without_hard_links_is_made_by_mlflow(tmp_path, monkeypatch):
    """Where the output_dir's filesystem refuses hard links, MLflow creates the database itself."""
    import os

    from mlflow import MlflowClient

    from sft_core.tracking import mlflow_store
    from sft_core.tracking.mlflow_tracker import MLflowTracker

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted", str(dst))

    monkeypatch.setenv("SFT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(mlflow_store.os, "link", no_links)
    db = tmp_path / "out" / "mlflow.db"
    tracker = MLflowTracker(f"sqlite:///{db}", "exp", str(tmp_path / "art"), "run", {})
    assert db.is_file() and sorted(os.listdir(db.parent)) == ["mlflow.db"]  # no staged copy left
    assert MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(tracker.run_id).info.run_name == "run"


def test_a_registry_lock_held_by_a_frozen_process_is_passed_over_with_a_warning(tmp_path, caplog):
    import fcntl
    import logging

    from sft_core.tracking.mlflow_store import registry_lock

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with open(tmp_path / "mlflow.db.registry.lock", "w") as holder:  # a holder that never lets go
        holder.write("4242")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX)
        entered = []
        with caplog.at_level(logging.WARNING), registry_lock(uri, wait_s=0.3):
            entered.append(True)
    assert entered == [True]
    assert "held for 0 s by process 4242" in caplog.text and "registering without it" in caplog.text
    with registry_lock(uri, wait_s=0.3):  # free again: taken at once, naming this process
        assert (tmp_path / "mlflow.db.registry.lock").read_text() == str(os.getpid())


@pytest.mark.slow
def test_through_a_tracking_server_a_checkpoint_is_uploaded_and_registered_from_its_store(
    tmp_path, tiny_model_dir
):
    """`mlflow server` refuses a version whose source is a local folder outside the run's artifacts
    (and no other host could read one): every registration failed. A checkpoint is now uploaded to
    the server's artifact store and registered from there, loadable after its folder is gone."""
    import subprocess
    import sys

    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM

    from flows.runtime import free_port, stop_process_group
    from sft_core.tracking.mlflow_model import write_mlflow_model
    from sft_core.tracking.mlflow_store import seed_sqlite
    from sft_core.tracking.mlflow_tracker import MLflowTracker

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    seed_sqlite(f"sqlite:///{tmp_path}/server.db")  # a migrated database: the server starts in half the time
    with (tmp_path / "server.log").open("w") as log:
        server = subprocess.Popen(
            [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
             "--artifacts-destination", str(tmp_path / "server-artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_http(f"{url}/health", server, (tmp_path / "server.log").read_text)

        tracker = MLflowTracker(url, "e", str(tmp_path / "never-used"), "r", {})
        folders = {}
        for step in (2, 4):
            folders[step] = tmp_path / "run" / f"checkpoint-{step}" / "sft_train"
            shutil.copytree(tiny_model_dir, folders[step])
            write_mlflow_model(folders[step])
        v1 = register_checkpoint(url, "m", str(folders[2]), tracker.run_id, 2, {"val_loss": 2.0})
        v2 = register_checkpoint(url, "m", str(folders[4]), tracker.run_id, 4, {"val_loss": 1.0})
        # A retried registration (the task's retries) takes the version it made before.
        again = register_checkpoint(url, "m", str(folders[4]), tracker.run_id, 4, {"val_loss": 1.0})
        assert (v1.version, v2.version, again.version, v2.is_best) == (1, 2, 2, True)
        client = MlflowClient(tracking_uri=url)
        assert len(client.search_model_versions("name='m'")) == 2
        best = client.get_model_version_by_alias("m", "best")
        assert int(best.version) == 2 and best.source == f"runs:/{tracker.run_id}/checkpoints/checkpoint-4"
        assert best.tags["checkpoint_dir"] == str(folders[4])
        assert not (tmp_path / "never-used").exists()  # the server's artifact store, not a local one

        shutil.rmtree(tmp_path / "run")  # the training host's folders are gone: the registry is not
        mlflow.set_tracking_uri(url)
        try:
            got = Path(mlflow.artifacts.download_artifacts("models:/m@best", dst_path=str(tmp_path / "dl")))
        finally:
            mlflow.set_tracking_uri(None)
        original = {p.name: p.read_bytes() for p in Path(tiny_model_dir).glob("*.safetensors")}
        assert original and {n: (got / n).read_bytes() for n in original} == original
        assert (got / "MLmodel").is_file()
        AutoModelForCausalLM.from_pretrained(got)
        tracker.close()
    finally:
        stop_process_group(server.pid)


def test_two_runs_creating_one_new_experiment_at_once_share_it(tmp_path, monkeypatch):
    """The second run's lookup came before the first run's insert: its create is refused by the
    database's unique name, and it takes the experiment the other made."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    other = MlflowClient(tracking_uri=uri)
    other.search_experiments()  # the database exists
    looked_up = MlflowClient.get_experiment_by_name
    calls = []

    def lookup_then_lose_the_race(self, name):
        calls.append(name)
        if len(calls) == 1:  # the first look finds nothing; the other run creates it right after
            other.create_experiment(name)
            return None
        return looked_up(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lookup_then_lose_the_race)
    tracker = MLflowTracker(uri, "exp", str(tmp_path / "art"), "run", {})
    assert len(calls) == 2  # looked again after the refused create
    assert tracker.experiment_id == other.get_experiment_by_name("exp").experiment_id
    tracker.close()


def test_the_trackers_writes_are_made_whole():
    """Each method that writes the MLflow run runs whole on the write thread (`uninterrupted`): a
    stop landing inside one would leave the store half-written."""
    writes = ("continue_after", "log_metrics", "close")
    assert all(hasattr(getattr(MLflowTracker, name), "__wrapped__") for name in writes)
