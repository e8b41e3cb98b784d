"""What an operator can do by accident must not lose a checkpoint, fail a finished run, leak a secret
or write into a run it does not own: odd paths and names, non-finite losses, secret-looking config
keys, secrets in dict form, a refused run, a retried flow run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.logging import disable_run_logger

from sft_core.config_loader import load_config
from sft_core.errors import ConfigError, StorageError, exception_chain
from sft_core.secrets import is_secret_key, literal_secret_overrides, move_secrets_to_env, redact
from sft_core.tracking.mlflow_tracker import MLflowTracker, default_tracking_uri, register_checkpoint
from sft_core.train import checkpoint as ckpt
from sft_core.train.run_folder import RunFolder, RunFolderBusy, RunLock, plan_run
from tests.test_run_folders import fake_save


def registered_run(out: Path, exp_name: str) -> tuple[str, RunFolder]:
    """A run with checkpoints at steps 1-4, each a registered version; step 2's is `best`."""
    uri = default_tracking_uri(str(out))
    run = plan_run(str(out), False, "aaaaaaaa-1111").run
    tracker = MLflowTracker(uri, exp_name, str(out / "mlflow" / "artifacts"), "r", {})
    for step in (1, 2, 3, 4):
        folder = fake_save(run, step) / "sft_train"
        loss = 1.0 if step == 2 else 2.0 + step
        register_checkpoint(uri, exp_name, str(folder), tracker.run_id, step, {"val_loss": loss})
    return uri, run


def prune(exp_name: str, out: Path, run: RunFolder, uri: str) -> list[str]:
    from tasks.train import prune_checkpoints

    cfg = load_config("sft_config", ["+experiment=smoke", "max_ckpt_to_keep=1"])
    cfg = cfg.model_copy(update={"exp_name": exp_name, "output_dir": str(out)})
    with disable_run_logger():  # the task's body, outside a flow run
        return prune_checkpoints.fn(cfg, str(run.root), uri)


def registered_sources(uri: str, exp_name: str) -> dict[int, Path]:
    """Each version's source folder (the names here hold no double quote)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from mlflow import MlflowClient

    versions = MlflowClient(tracking_uri=uri).search_model_versions(f'name="{exp_name}"')
    return {int(v.version): Path(url2pathname(urlparse(v.source).path)) for v in versions}


@pytest.mark.parametrize("folder", ["my runs", "100% #1", "q?v=1"])
def test_pruning_keeps_the_best_checkpoint_when_output_dir_needs_percent_encoding(tmp_path, folder):
    out = tmp_path / folder
    uri, run = registered_run(out, "m")
    prune("m", out, run, uri)
    assert [p.name for p in ckpt.checkpoints_in_run(run)] == ["checkpoint-2", "checkpoint-4"]
    sources = registered_sources(uri, "m")
    assert sorted(sources) == [2, 4] and all(p.is_dir() for p in sources.values())


@pytest.mark.parametrize("folder", ["q?v=1", "p%41", "h#1", "100% #1", "my runs"])
def test_the_tracking_database_stays_inside_an_output_dir_that_needs_percent_encoding(tmp_path, folder):
    """In a sqlite URI a '?' starts SQLAlchemy's query and %XX is decoded: such a path is quoted."""
    import sqlite3

    from sft_core.tracking.mlflow_store import registry_lock, sqlite_path

    out = tmp_path / folder
    db = out / "mlflow" / "mlflow.db"
    uri = default_tracking_uri(str(out))
    MLflowTracker(uri, "e", str(out / "artifacts"), "r", {})  # SQLAlchemy opens the database
    assert sqlite_path(uri) == db
    with sqlite3.connect(db) as c:
        assert ("e",) in c.execute("SELECT name FROM experiments").fetchall()
    with registry_lock(uri):
        assert db.with_name("mlflow.db.registry.lock").is_file()
    # No file outside output_dir: a quoted URI only gets the empty folders MLflow makes as it spells it.
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(out)]
    if folder in ("h#1", "100% #1", "my runs"):  # a path SQLAlchemy reads as it is is written so
        assert uri == f"sqlite:///{db}" and list(tmp_path.iterdir()) == [out]


def test_pruning_a_model_named_with_a_quote_removes_folders_and_their_versions_together(tmp_path):
    cfg = load_config("sft_config", ["+experiment=smoke", 'exp_name="it\'s"'])
    assert cfg.exp_name == "it's"  # the config takes it, so pruning must too
    uri, run = registered_run(tmp_path, "it's")
    prune("it's", tmp_path, run, uri)
    assert [p.name for p in ckpt.checkpoints_in_run(run)] == ["checkpoint-2", "checkpoint-4"]
    sources = registered_sources(uri, "it's")
    assert sorted(sources) == [2, 4] and all(p.is_dir() for p in sources.values())


def test_the_run_summary_commands_paste_as_they_are_whatever_the_paths(capsys):
    import ast
    import shlex

    from flows.cli import print_summary

    odd = '/tmp/sp ace/it\'s "q" $HOME'
    result = {
        "exp_name": "e", "total_steps": 1, "final_checkpoint": f"{odd}/checkpoint-1/sft_train",
        "mlflow_tracking_uri": f"sqlite:///{odd}/mlflow.db", "mlflow_run_id": "r", "mlflow_experiment_id": "1",
        "registered_model": "e", "model_version": 1, "flow_run_id": "f", "tensorboard_dir": f"{odd}/tensorboard",
    }  # fmt: skip
    print_summary(result, 1.0)
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    tensorboard = next(line for line in lines if line.startswith("tensorboard "))
    assert shlex.split(tensorboard) == ["tensorboard", "--logdir", result["tensorboard_dir"]]
    load = next(line for line in lines if line.startswith("load it: "))
    call = load.removeprefix("load it: AutoModelForCausalLM.from_pretrained(").removesuffix(")")
    assert ast.literal_eval(call) == result["final_checkpoint"]
    ui = next(line for line in lines if line.startswith("open the UI"))
    command = ui.removeprefix("open the UI").split("   then")[0]
    assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", result["mlflow_tracking_uri"],
                                    "--port", "5000"]  # fmt: skip
    assert "registered model  e version 1 (models:/e/1)" in lines
    # A run from another output_dir's checkpoint that already completes it registers nothing here.
    print_summary({**result, "model_version": None}, 1.0)
    assert (
        "registered model  e: no version in this registry (the checkpoint started from already completes the run)"
        in [line.strip() for line in capsys.readouterr().out.splitlines()]
    )


def test_a_registry_error_while_pruning_removes_no_checkpoint_folder(tmp_path):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = "both ' and \""  # a name no MLflow search can quote: the query for versions fails
    uri = default_tracking_uri(str(tmp_path))
    run = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    tracker = MLflowTracker(uri, name, str(tmp_path / "artifacts"), "r", {})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(name)
    for step in (1, 2, 3, 4):  # registered by hand: register_checkpoint searches by name too
        source = (fake_save(run, step) / "sft_train").as_uri()
        version = client.create_model_version(name, source=source, run_id=tracker.run_id)
    client.set_registered_model_alias(name, "best", version.version)  # the alias lookup works
    with pytest.raises((ValueError, MlflowException)):
        prune(name, tmp_path, run, uri)
    assert [p.name for p in ckpt.checkpoints_in_run(run)] == [f"checkpoint-{s}" for s in (1, 2, 3, 4)]


def test_an_exp_name_no_registry_search_can_quote_is_refused_at_config_time():
    with pytest.raises(ConfigError, match="config key 'exp_name'.*not both ' and \""):
        load_config("sft_config", ["+experiment=smoke", "exp_name='it\\'s \"x\"'"])


def test_the_loss_chart_shows_non_finite_losses_instead_of_failing_the_run():
    from flows.artifacts import loss_chart

    history = [
        {"step": 1, "sft_train/loss": 2.0},
        {"step": 2, "sft_train/loss": float("nan"), "sft_train/val_loss": float("inf")},
        {"step": 3, "sft_train/loss": 1.0, "sft_train/val_loss": float("-inf")},
    ]
    lines = loss_chart(history, width=4).splitlines()
    assert lines[2] == "| 1 | 2.0000 | `████` |  |  |"  # the scale ignores the non-finite values
    assert lines[3] == "| 2 | nan | `?` | inf | `?` |"
    assert lines[4] == "| 3 | 1.0000 | `██` | -inf | `?` |"


@pytest.mark.parametrize(
    "key", ["system_envs.ANYTHING", "HF_TOKEN", "hf_token", "token", "tracker_kwargs.api_key", "WANDB_API_KEY",
            "accessToken", "db_password", "client_secret", "aws_secret_access_key", "credentials",
            "tracker_kwargs.key", "tracker_kwargs.auth", "tracker_kwargs.headers.Authorization"],
)  # fmt: skip
def test_secret_names_are_redacted(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["sft_train.data_args.truncate_keep_end_token", "max_tokens", "num_tokens", "eos_token",
            "pad_token", "tokenizer_dir", "seed", "prompt_key", "response_key", "system_key"],
)  # fmt: skip
def test_config_names_that_mention_tokens_are_not_redacted(key):
    assert not is_secret_key(key)
    assert redact({key: True}) == {key: True}


@pytest.mark.parametrize("prefix", ["+", "", "++"])
def test_a_secret_given_in_dict_form_is_refused_and_never_echoed(prefix):
    override = prefix + "system_envs={HF_TOKEN:hf_secret_value,OTHER:x}"
    assert literal_secret_overrides([override]) == ["system_envs.HF_TOKEN", "system_envs.OTHER"]
    env: dict[str, str] = {}
    with pytest.raises(ConfigError, match=r"\+system_envs\.HF_TOKEN=") as err:
        move_secrets_to_env([override], env)
    assert "hf_secret_value" not in str(err.value) and env == {}
    nested = "tracker_kwargs={log_dir:/tmp/tb,auth:{api_key:k}}"
    assert literal_secret_overrides([nested]) == ["tracker_kwargs.auth.api_key"]
    # References are fine in either form, and so is a dict holding no secret.
    fine = ["+system_envs={HF_TOKEN:'${oc.env:HF_TOKEN}'}", "tracker_kwargs={log_dir:/tmp/tb}"]
    assert move_secrets_to_env(fine, env) == fine and env == {}


def test_a_refused_run_writes_nothing_into_the_busy_folder(tmp_path):
    first = plan_run(str(tmp_path), False, "aaaaaaaa-1111")
    fake_save(first.run, 2)
    before = first.run.info_path.read_bytes()
    with RunLock(first.run, {"flow_run_id": "aaaaaaaa-1111"}):  # a live run trains into it
        # What the flow does: plan (resume: auto picks the busy run's newest checkpoint), then lock.
        plan = plan_run(str(tmp_path), "auto", "bbbbbbbb-2222")
        assert plan.run.root == first.run.root
        with pytest.raises(RunFolderBusy), RunLock(plan.run, {"flow_run_id": "bbbbbbbb-2222"}):
            plan.run.record_flow_run("bbbbbbbb-2222")
    assert first.run.info_path.read_bytes() == before


def test_a_retried_flow_run_logs_each_metric_once_per_step(tmp_path):
    from mlflow import MlflowClient

    uri = default_tracking_uri(str(tmp_path))
    first = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "r", {})
    first.log_metrics({"data/train/rows": 10.0, "sft_train/val_loss": 3.0}, 0)
    for step in (1, 2, 3):
        first.log_metrics({"sft_train/loss": 1.0 / step}, step)
    # The retry resumes from the checkpoint at step 2 and logs the data metrics and steps 3-4 again.
    retry = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "r", {}, first.run_id, resume_step=2)
    retry.log_metrics({"data/train/rows": 10.0}, 0)
    for step in (3, 4):
        retry.log_metrics({"sft_train/loss": 1.0 / step}, step)
    client = MlflowClient(tracking_uri=uri)
    steps = {k: sorted(m.step for m in client.get_metric_history(first.run_id, k)) for k in
             ("data/train/rows", "sft_train/val_loss", "sft_train/loss")}  # fmt: skip
    assert steps == {"data/train/rows": [0], "sft_train/val_loss": [0], "sft_train/loss": [1, 2, 3, 4]}


def test_steps_an_earlier_attempt_logged_after_the_checkpoint_show_the_resumed_values(tmp_path):
    """An attempt killed at step 9 after checkpoint 6, resumed with another schedule (an allowed
    change): steps 7-9 are trained again with other values. They replace the killed attempt's in
    MLflow (as TensorBoard's purge does), one point a step, and each key's latest value follows."""
    from mlflow import MlflowClient

    uri = default_tracking_uri(str(tmp_path))
    first = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "r", {})
    first.log_metrics({"data/train/rows": 10.0}, 0)
    for step in range(1, 10):
        first.log_metrics({"sft_train/loss": 10.0 - step, "sft_train/lr": 1e-3 / step}, step)
    first.log_metrics({"sft_train/val_loss": 4.0}, 6)
    resumed = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "r", {}, first.run_id, resume_step=6)
    resumed.log_metrics({"data/train/rows": 10.0}, 0)  # a retry logs the data metrics again
    for step in (7, 8):
        resumed.log_metrics({"sft_train/loss": 20.0 + step, "sft_train/lr": 1e-3}, step)
    client = MlflowClient(tracking_uri=uri)
    history = {k: [(m.step, m.value) for m in sorted(client.get_metric_history(first.run_id, k), key=lambda m: m.step)]
               for k in ("sft_train/loss", "sft_train/lr", "sft_train/val_loss", "data/train/rows")}  # fmt: skip
    assert history["sft_train/loss"] == [(s, 10.0 - s) for s in range(1, 7)] + [(7, 27.0), (8, 28.0)]
    assert [v for _, v in history["sft_train/lr"]][6:] == [1e-3, 1e-3]
    assert history["sft_train/val_loss"] == [(6, 4.0)] and history["data/train/rows"] == [(0, 10.0)]
    latest = client.get_run(first.run_id).data.metrics  # MLflow's latest_metrics: step 8 now, not 9
    assert latest["sft_train/loss"] == 28.0 and latest["sft_train/val_loss"] == 4.0


def test_a_run_branched_from_another_runs_checkpoint_logs_to_an_mlflow_run_of_its_own(tmp_path):
    from flows.sft_pipeline import start_tracking

    cfg = load_config("sft_config", ["+experiment=smoke"])
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path), "logging_dir": str(tmp_path / "tb")})
    first = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    original, trackers = start_tracking(cfg, "aaaaaaaa-1111", first, {})
    trackers.close("FINISHED")
    state = {"global_step": 2, "mlflow_run_id": original.run_id}  # what checkpoint-2 records

    older = fake_save(first, 2)
    fake_save(first, 4)
    branch = plan_run(str(tmp_path), str(older), "bbbbbbbb-2222").run  # not the newest: a branch
    branched, trackers = start_tracking(cfg, "bbbbbbbb-2222", branch, state)
    trackers.close("FINISHED")
    assert branched.run_id != original.run_id
    assert branched.client.get_run(branched.run_id).data.tags["sft.branched_from"].endswith("checkpoint-2")

    again, trackers = start_tracking(cfg, "bbbbbbbb-2222", branch, state)  # a retry of the branch
    trackers.close("FINISHED")
    assert again.run_id == branched.run_id
    resumed, trackers = start_tracking(cfg, "cccccccc-3333", first, state)  # continuing the first run
    trackers.close("FINISHED")
    assert resumed.run_id == original.run_id


def test_a_flow_run_whose_process_died_holding_its_folder_is_set_crashed(prefect_server):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    from flows.runtime import mark_crashed

    @flow(name="killed-holder")
    def killed_holder() -> None: ...

    with get_client(sync_client=True) as client:
        dead = client.create_flow_run(killed_holder, state=Running())
        done = client.create_flow_run(killed_holder, state=Completed())
        assert mark_crashed(str(dead.id), "its process died")
        assert client.read_flow_run(dead.id).state.type.value == "CRASHED"
        assert not mark_crashed(str(done.id), "its process died")  # a final state is kept
        assert client.read_flow_run(done.id).state.type.value == "COMPLETED"
        assert not mark_crashed(
            "00000000-0000-0000-0000-000000000000", "its process died"
        )  # not on this server


def test_runs_killed_holding_other_folders_are_ended_by_the_next_run(prefect_server, tmp_path):
    """A run killed with SIGKILL (or by the OOM killer) whose folder no run resumes kept its flow run
    and its MLflow run RUNNING for good. The next run in the same output_dir ends both; a live
    holder, a cleanly ended run and the new run's own folder are left alone."""
    import json
    import socket
    import subprocess
    import sys

    from mlflow import MlflowClient
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.sft_pipeline import report_runs_that_died
    from sft_core.train.run_folder import pid_namespace, runs_root

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    uri = default_tracking_uri(str(tmp_path))
    current = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "current", {})
    client = MlflowClient(uri)

    @flow(name="held-a-folder")
    def held() -> None: ...

    folders: dict[str, tuple[str, str]] = {}
    with get_client(sync_client=True) as prefect:
        here = pid_namespace()
        cases = {
            "killed": (gone.pid, here),
            "alive": (os.getpid(), here),
            "clean": (None, here),
            "current": (gone.pid, here),
            "elsewhere": (gone.pid, "another-boot/4026531836"),  # another machine or container, same name
            "older": (gone.pid, None),  # a lock written before the record: cannot tell
        }
        for name, (pid, where) in cases.items():
            run = RunFolder(runs_root(tmp_path) / name)
            run.root.mkdir(parents=True)
            flow_run = str(prefect.create_flow_run(held, state=Running()).id)
            mlflow_run = client.create_run(current.experiment_id).info.run_id
            run.update_info(mlflow_run_id=mlflow_run)
            holder = {"pid": pid, "host": socket.gethostname(), "flow_run_id": flow_run} if pid else None
            if holder and where:
                holder["where"] = where
            (run.root / ".lock").write_text(json.dumps(holder) if holder else "")
            folders[name] = (flow_run, mlflow_run)

        @flow(name="next-run")
        def next_run() -> None:
            report_runs_that_died(str(tmp_path), RunFolder(runs_root(tmp_path) / "current"), current)

        for _ in range(2):  # a second run finds nothing more to do
            next_run()
            states = {n: prefect.read_flow_run(f).state.type.value for n, (f, _) in folders.items()}
            statuses = {n: client.get_run(m).info.status for n, (_, m) in folders.items()}
            assert states == {n: "CRASHED" if n == "killed" else "RUNNING" for n in cases}
            assert statuses == {n: "FAILED" if n == "killed" else "RUNNING" for n in cases}
    why = client.get_run(folders["killed"][1]).data.tags["sft.failure"]
    assert f"pid {gone.pid}" in why and "killed" in why
    assert (
        json.loads((runs_root(tmp_path) / "killed" / ".lock").read_text())["pid"] == gone.pid
    )  # read, not taken


def test_registering_a_checkpoint_again_takes_the_version_it_made(tmp_path):
    from mlflow import MlflowClient

    uri = default_tracking_uri(str(tmp_path))
    tracker = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "r", {})
    run = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    folder = str(fake_save(run, 2) / "sft_train")
    first = register_checkpoint(uri, "m", folder, tracker.run_id, 2, {"val_loss": 1.0})
    again = register_checkpoint(uri, "m", folder, tracker.run_id, 2, {"val_loss": 1.0})  # a task retry
    assert again.version == first.version
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [int(v.version) for v in client.search_model_versions("name='m'")] == [first.version]
    assert int(client.get_model_version_by_alias("m", "best").version) == first.version


def _raise_termination(signum: int, frame: object) -> None:
    from prefect.exceptions import TerminationSignal

    raise TerminationSignal(signal=signum)  # as Prefect's own SIGTERM handler does in a flow run


@pytest.mark.parametrize("stop", ["ctrl-c", "cancel"])
@pytest.mark.parametrize("write", ["register a version", "log metrics", "prune"])
def test_a_stop_arriving_as_an_mlflow_write_commits_leaves_it_whole_and_the_database_free(
    tmp_path, stop, write
):
    """A stop's exception raised in a commit leaves sqlite's write lock held, so the stop could not
    end the MLflow run KILLED ("database is locked" after 20 s; seen in a test run with a cancel).
    The writes run on a thread of their own: the stop reaches the caller at once, the write
    finishes whole, the stop's close("KILLED") waits for it, and no signal handler is swapped
    meanwhile (Prefect commits a cancel only while its own handler is installed)."""
    import sqlite3

    from mlflow import MlflowClient
    from prefect.exceptions import TerminationSignal
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from sft_core.tracking.mlflow_tracker import delete_versions, write_whole

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "r", {})
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    register_checkpoint(uri, "m", str(folder), tracker.run_id, 1, {"val_loss": 2.0})
    sig, handler, raised = {
        # Python's own Ctrl-C handler, as in a terminal: a shell's background job starts with SIGINT
        # ignored (a CI runner may start pytest so), and an ignored SIGINT would never arrive.
        "ctrl-c": (signal.SIGINT, signal.default_int_handler, KeyboardInterrupt),
        "cancel": (signal.SIGTERM, _raise_termination, TerminationSignal),
    }[stop]
    writes, fired, handlers_seen = [], [], []

    def statement(conn, cursor, sql, *args):
        writes.append(sql.lstrip().startswith(("INSERT", "UPDATE", "DELETE")))

    def commit(conn):  # the stop arrives as the first write's transaction commits
        handlers_seen.append(signal.getsignal(sig))
        if any(writes) and not fired:
            fired.append(True)
            os.kill(os.getpid(), sig)
            time.sleep(0.2)  # the main thread has its exception by now, the commit not yet done

    def prune() -> None:  # a prune's order: the versions, then the folder
        delete_versions(uri, "m", [1])
        shutil.rmtree(folder)

    (tmp_path / "ckpt").mkdir()
    previous = signal.signal(sig, handler)
    event.listen(Engine, "before_cursor_execute", statement)
    event.listen(Engine, "commit", commit)
    try:
        with pytest.raises(raised):
            if write == "register a version":
                register_checkpoint(uri, "m", str(tmp_path / "ckpt"), tracker.run_id, 2, {"val_loss": 1.0})
            elif write == "log metrics":
                tracker.log_metrics({"loss": 1.5, "lr": 1e-4}, step=3)
            else:
                write_whole(prune)
        tracker.close("KILLED")  # what the stop does next: it waits for the write on its thread
    finally:
        event.remove(Engine, "commit", commit)
        event.remove(Engine, "before_cursor_execute", statement)
        signal.signal(sig, previous)
    assert fired, "the signal was never sent"
    assert handlers_seen and all(h is handler for h in handlers_seen)
    # No lock left behind: another connection can write at once.
    db = sqlite3.connect(tmp_path / "mlflow.db", timeout=0.5)
    db.execute("BEGIN IMMEDIATE")
    db.rollback()
    db.close()
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_run(tracker.run_id).info.status == "KILLED"
    versions = sorted(int(v.version) for v in client.search_model_versions("name='m'"))
    if write == "register a version":  # whole: the version and both its aliases
        assert versions == [1, 2]
        assert client.get_model_version_by_alias("m", "last_saved").version == 2
        assert client.get_model_version_by_alias("m", "best").version == 2
    elif write == "log metrics":
        assert client.get_run(tracker.run_id).data.metrics == {"loss": 1.5, "lr": 1e-4}
    else:  # the prune went on to its end: no version names a folder that is gone
        assert versions == [] and not folder.exists()


def test_a_write_left_running_by_a_stop_is_finished_at_exit_and_never_holds_the_process(tmp_path):
    """The write thread is a daemon (`sft` joins every other thread before it exits: a pool's
    worker hung it there), and what it still has queued at exit is written before the process ends."""
    import subprocess
    import sys

    done = tmp_path / "done"
    code = (
        "import threading, time\n"
        "from sft_core.tracking.mlflow_tracker import _writes, write_whole\n"
        "write_whole(print, 'first write')\n"
        f"_writes.submit(lambda: (time.sleep(1), open({str(done)!r}, 'w').write('x')))  # a stop's caller left\n"
        "assert all(t.daemon for t in threading.enumerate() if t is not threading.main_thread())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "first write\n" and done.read_text() == "x"


def test_only_a_failed_request_to_the_prefect_api_reads_as_a_lost_server():
    """The CLI's "Prefect server stopped answering" (exit 75) must not be said of another host's
    failure, such as a model hub's (huggingface_hub speaks httpx too)."""
    import httpx

    from flows.runtime import free_port, lost_prefect_api

    def failure(url: str) -> BaseException:
        try:
            try:
                httpx.Client().get(url)
            except httpx.TransportError as err:
                raise RuntimeError("a task failed") from err  # as Prefect wraps it
        except RuntimeError as wrapped:
            return wrapped
        raise AssertionError(f"{url} answered")

    port = free_port()
    other = next(p for p in iter(free_port, None) if p != port)
    api = f"http://127.0.0.1:{port}/api"
    assert isinstance(lost_prefect_api(failure(f"{api}/flow_runs/"), api), httpx.ConnectError)
    assert lost_prefect_api(failure(f"http://127.0.0.1:{other}/models/x"), api) is None
    assert lost_prefect_api(httpx.ConnectError("no request known"), api) is None
    assert lost_prefect_api(ValueError("unrelated"), api) is None


def test_a_frozen_prefect_server_is_a_lost_server_not_a_stop_from_outside():
    """A server that accepts connections and never answers (SIGSTOPped, hung) ends Prefect's async
    requests in a read timeout raised from asyncio's cancellation. That is a failure of the API
    (exit 75, MLflow run FAILED), not a stop by the user (it was taken for one: MLflow run KILLED)."""
    import asyncio
    import socket

    import httpx

    from flows.runtime import lost_prefect_api
    from flows.sft_pipeline import stopped_from_outside

    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen()  # connections queue in the kernel; nothing reads them
        api = f"http://127.0.0.1:{frozen.getsockname()[1]}/api"

        async def request() -> None:
            async with httpx.AsyncClient(timeout=0.5) as client:  # as Prefect's engine calls the API
                await client.post(f"{api}/flow_runs/")

        with pytest.raises(httpx.ReadTimeout) as timeout:
            asyncio.run(request())
    assert any(isinstance(e, asyncio.CancelledError) for e in exception_chain(timeout.value))
    assert not stopped_from_outside(timeout.value)
    assert lost_prefect_api(timeout.value, api) is timeout.value
    assert stopped_from_outside(KeyboardInterrupt())


def test_a_tracking_server_that_stopped_answering_is_told_from_other_failures(monkeypatch):
    """The CLI's "MLflow tracking server stopped answering" (exit 75) is said of a failed request to
    that server, through MLflow's own client and its wrapping, and of nothing else."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from flows.runtime import free_port
    from sft_core.tracking.mlflow_tracker import lost_tracking_server

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after a backoff
    port = free_port()
    other = next(p for p in iter(free_port, None) if p != port)
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(MlflowException) as caught:
        MlflowClient(tracking_uri=uri).log_metric("0" * 32, "loss", 1.0, step=1)
    assert lost_tracking_server(caught.value, uri) is not None
    assert lost_tracking_server(caught.value, f"http://127.0.0.1:{other}") is None
    assert lost_tracking_server(caught.value, "sqlite:///mlflow.db") is None
    assert lost_tracking_server(MlflowException("RESOURCE_DOES_NOT_EXIST"), uri) is None


def test_a_registration_is_retried_unless_the_tracking_server_stopped_answering(
    prefect_server, tmp_path, monkeypatch
):
    """MLflow's client retries a dead server for minutes; the register task's own two retries on
    top held a run ~12 minutes before it stopped. They are kept for other failures."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows.runtime import free_port
    from tasks.train import register_model

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead_server = f"http://127.0.0.1:{free_port()}"
    not_a_database = tmp_path / "file"
    not_a_database.write_text("not sqlite")
    stores = {dead_server: 1, f"sqlite:///{not_a_database}": 3}  # store -> attempts expected

    @flow(name="register-once")
    def register_once(uri: str) -> str:
        state = register_model(uri, "m", str(tmp_path), "0" * 32, 1, {}, {}, "", "val_loss", False,
                               return_state=True)  # fmt: skip
        assert state.is_failed(), state
        return str(state.state_details.task_run_id)

    for uri, attempts in stores.items():
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        task_run_id = register_once(uri)
        with get_client(sync_client=True) as client:
            assert client.read_task_run(task_run_id).run_count == attempts, uri


def test_ray_agents_orphaned_by_a_killed_run_are_stopped_and_live_ones_kept(tmp_path):
    import os
    import subprocess
    import time

    from flows.ray_start import reap_orphaned_ray_agents

    # An agent whose raylet was SIGKILLed: its parent is gone, it is re-parented.
    subprocess.run(
        ["bash", "-c", f"(exec -a ray::DashboardAgent sleep 120) & echo $! > {tmp_path}/orphan"], check=True
    )
    # An agent under a live raylet (a process titled so), which must be left alone.
    raylet = subprocess.Popen(
        [
            "bash",
            "-c",
            f"exec -a raylet bash -c '(exec -a ray::RuntimeEnvAgent sleep 120) & echo $! > {tmp_path}/live; wait'",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while not ((tmp_path / "orphan").is_file() and (tmp_path / "live").is_file()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        orphan, live = int((tmp_path / "orphan").read_text()), int((tmp_path / "live").read_text())
        time.sleep(0.2)  # both exec'd into their titles
        reaped = reap_orphaned_ray_agents()  # (and any real orphan on this machine)
        assert orphan in reaped and live not in reaped
        time.sleep(0.2)
        assert not Path(f"/proc/{orphan}").exists() or b"Z" in Path(f"/proc/{orphan}/stat").read_bytes()[:60]
        os.kill(live, 0)  # still alive
    finally:
        raylet.kill()
        for name in ("orphan", "live"):
            with contextlib.suppress(Exception):
                os.kill(int((tmp_path / name).read_text()), 9)


def test_best_moves_only_on_a_real_improvement_not_a_tie(tmp_path):
    uri = default_tracking_uri(str(tmp_path))
    tracker = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "r", {})
    run = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    folders = [str(fake_save(run, step) / "sft_train") for step in (1, 2, 3)]
    first = register_checkpoint(uri, "m", folders[0], tracker.run_id, 1, {"val_loss": 10.324565958452306})
    tie = register_checkpoint(uri, "m", folders[1], tracker.run_id, 2, {"val_loss": 10.324565958452306})
    # Below the full value, equal as the tag holds it ("10.3246"): still a tie.
    rounded_tie = register_checkpoint(uri, "m", folders[2], tracker.run_id, 3, {"val_loss": 10.32455})
    assert first.is_best and not tie.is_best and not rounded_tie.is_best
    best = MLflowTracker(uri, "e", str(tmp_path / "artifacts"), "r", {}).client.get_model_version_by_alias(
        "m", "best"
    )
    assert int(best.version) == first.version


@pytest.mark.parametrize(
    "override",
    [
        "+system_envs.HF_TOKEN=${oc.env:NOT_SET_ANYWHERE,hf_secretDefault42}",  # the default is stored
        "+system_envs={HF_TOKEN: hf_secretDefault42",  # unreadable: Hydra's error would print it
    ],
)
def test_a_secret_that_would_be_stored_or_printed_is_refused_without_echoing_it(override):
    with pytest.raises(ConfigError) as err:
        move_secrets_to_env([override], {})
    assert "hf_secretDefault42" not in str(err.value)
    assert (
        literal_secret_overrides(["+system_envs.HF_TOKEN=${oc.env:HF_TOKEN}"]) == []
    )  # a bare reference is fine


def test_a_ray_call_before_ray_is_started_fails_instead_of_starting_an_open_ray():
    """Ray's auto-init would start a bare ray.init(): every interface, a dashboard. Our cluster code
    turns it off, so a call made too early fails, and starts nothing."""
    import subprocess
    import sys

    code = (
        "import ray, sft_core.cluster.cluster\n"
        "try:\n    ray.put(1)\nexcept Exception as err:\n    print('refused:', type(err).__name__)\n"
        "print('initialized:', ray.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in out.stdout and "initialized: False" in out.stdout, out.stdout + out.stderr[-2000:]


STOPPED_IN_A_CALLBACK = """
import os, signal, sys, time, weakref
import ray
from flows.ray_start import RayStart, local_init_kwargs

start = RayStart("local", {"namespace": "t", **local_init_kwargs()})
start.wait()


@ray.remote
class Stopped:
    def stop_inside_a_callback(self):
        # A SIGTERM that lands where Python cannot raise (here a weakref callback; in CI an import's):
        # Ray's handler raises SystemExit there, which Python prints as 'Exception ignored in'.
        class Thing:
            pass

        thing = Thing()
        ref = weakref.ref(thing, lambda _: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))
        del thing
        print("still-here-on-stderr", file=sys.stderr, flush=True)
        return ref is not None


ray.get(Stopped.remote().stop_inside_a_callback.remote())
time.sleep(3)  # Ray forwards worker output about once a second
ray.shutdown()
start.release()
"""


@pytest.mark.slow
def test_ray_stop_tracebacks_of_workers_are_not_shown_but_their_other_output_is():
    """A run failing early kills its starting actors; a worker stopped inside an import printed Ray's
    SIGTERM-handler traceback into the user's terminal after the run's clear error (seen in CI)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", STOPPED_IN_A_CALLBACK], capture_output=True, text=True,
                         timeout=180, cwd=Path(__file__).parents[1])  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "still-here-on-stderr" in text, text[-3000:]
    assert "sigterm_handler" not in text and "Traceback" not in text, text[-3000:]


SHUT_DOWN = """
import json, ray
from flows.ray_start import RayStart, local_init_kwargs, stop_monitor

start = RayStart("local", {"namespace": "t", **local_init_kwargs()})
start.wait()
processes = {kind: [i.process for i in infos] for kind, infos in ray._private.worker._global_node.all_processes.items()}
stop_monitor()
monitor = [p.returncode for p in processes["monitor"]]
ray.shutdown()
start.release()
alive = [kind for kind, ps in processes.items() for p in ps if p.poll() is None]
print(json.dumps({"monitor": monitor, "kinds": sorted(processes), "alive": alive}))
"""


DISCARDED = """
import json, os, time
from flows.ray_start import begin_local_start, discard_early_start, take_early_start

def ray_processes():
    found = set()
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
            state = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and (b"ray::" in cmd or any(n in cmd for n in (b"raylet", b"gcs_server", b"ray/dashboard"))):
            found.add(pid)
    return found

before = ray_processes()
begin_local_start()
time.sleep(1.5)  # mid-start: the GCS up, the raylet and its agents coming
discard_early_start()
print(json.dumps({"left": sorted(ray_processes() - before), "taken": take_early_start() is not None}))
"""


def test_a_ray_start_no_flow_took_over_is_shut_down_whole():
    """`sft run` begins Ray's start before its flow; stopped before the flow took it over (Ctrl-C, an
    import error), the start is waited for and shut down: stopped mid-start, Ray's agents outlived
    the command."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", DISCARDED], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"left": [], "taken": False}, out.stdout


def test_a_local_ray_is_shut_down_whole_with_its_monitor_killed_first():
    """ray.shutdown waited a second at the end of every run for Ray's autoscaler monitor, which does not
    exit on its SIGTERM; the runner kills it first. Every process the start made is gone after."""
    import json
    import signal
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SHUT_DOWN], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["monitor"] == [-signal.SIGKILL], seen
    assert {"gcs_server", "raylet", "log_monitor"} <= set(seen["kinds"]), seen
    assert seen["alive"] == [], seen


def test_a_checkpoint_the_disk_has_no_room_for_is_refused_before_anything_is_written(tmp_path):
    run = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    ckpt.check_room(run, 2)  # no checkpoint yet: nothing to measure by
    staged = run.staging(2)
    (staged / "sft_train").mkdir(parents=True)
    # A sparse file: as large as the disk's free space and 1 GiB more, on no blocks at all.
    with open(staged / "sft_train" / "model.safetensors", "wb") as f:
        f.truncate(shutil.disk_usage(tmp_path).free + (1 << 30))
    (staged / "train_state").mkdir()
    (staged / "train_state" / "rank0.pt").write_bytes(b"r")
    ckpt.publish(run, 2, {"global_step": 2}, 1)
    with pytest.raises(StorageError, match=r"step 4: .* free and the run's checkpoints take .*checkpoint-2.*"
                       r"Nothing was written.*resume_from_checkpoint=auto continues from checkpoint-2"):  # fmt: skip
        ckpt.check_room(run, 4)
    assert not run.staging(4).exists()
    small = plan_run(str(tmp_path / "small"), False, "bbbbbbbb-2222").run
    fake_save(small, 2)
    ckpt.check_room(small, 4)  # room for another: nothing said


@pytest.fixture
def full_disk(tmp_path) -> Iterator[Path]:
    """A 20 MiB tmpfs: the tiny model's first checkpoint (~39 MB) does not fit on it."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(disk)], capture_output=True
    )
    assert mounted.returncode == 0, f"this test mounts a tmpfs (needs root): {mounted.stderr.decode()}"
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_disk_that_fills_during_a_checkpoint_gets_a_clear_error_and_its_space_back(full_disk):
    """Seen by hand: torch's 'unexpected pos 704 vs 598' from both ranks, the partial checkpoint left
    holding the disk's last blocks, then MLflow unable to end the run ('database or disk is full')."""
    from mlflow import MlflowClient

    from tests.helpers import run_cli

    out = full_disk / "out"
    result = run_cli(
        ["run", "+experiment=smoke", f"output_dir={out}", f"logging_dir={out}/tb"], cwd=full_disk.parent
    )
    text = result.stdout + result.stderr
    assert result.returncode == StorageError.exit_code, text[-3000:]
    assert "sft: error: checkpoint at step 3: the disk of" in text and "is full" in text, text[-3000:]
    assert "The partial checkpoint was removed" in text and "Traceback" not in text, text[-3000:]
    assert not list(out.glob("runs/*/sft_train/.checkpoint-*")), "the partial checkpoint is gone"
    assert shutil.disk_usage(full_disk).free > 10 << 20, "its space is back"
    client = MlflowClient(tracking_uri=default_tracking_uri(str(out)))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.parametrize("stop", ["ctrl-c", "cancel"])
def test_a_stop_while_the_mlflow_run_is_created_leaves_no_run_running(tmp_path, stop):
    """A stop that lands while the MLflow run is being created reaches the flow before the run's
    id does (the creation finishes on the write thread): the id is recorded in run.json in the
    same write, so the flow's stop path finds the run and ends it, instead of leaving it RUNNING."""
    from mlflow import MlflowClient
    from prefect.exceptions import TerminationSignal
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from flows.sft_pipeline import end_unopened_tracking, start_tracking

    cfg = load_config("sft_config", ["+experiment=smoke", f"output_dir={tmp_path}"])
    run = plan_run(cfg.output_dir, False, "aaaaaaaa-1111").run
    sig, handler, raised, status = {
        "ctrl-c": (signal.SIGINT, signal.default_int_handler, KeyboardInterrupt, "KILLED"),
        "cancel": (signal.SIGTERM, _raise_termination, TerminationSignal, "KILLED"),
    }[stop]
    fired: list[bool] = []

    def commit(conn):  # the stop arrives as the run's creation commits
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), sig)
            time.sleep(0.2)

    previous = signal.signal(sig, handler)
    event.listen(Engine, "commit", commit)
    try:
        with pytest.raises(raised):
            start_tracking(cfg, "aaaaaaaa-1111", run, {})
        # What the flow's stop path does next; it queues behind the creation on the write thread.
        end_unopened_tracking(cfg, run, status, "KeyboardInterrupt while it started")
    finally:
        event.remove(Engine, "commit", commit)
        signal.signal(sig, previous)
    assert fired
    run_id = run.info()["mlflow_run_id"]
    client = MlflowClient(default_tracking_uri(cfg.output_dir))
    assert client.get_run(run_id).info.status == status
    assert client.get_run(run_id).data.tags["sft.failure"] == "KeyboardInterrupt while it started"
    assert [r.info.status for r in client.search_runs([client.get_run(run_id).info.experiment_id])] == [
        status
    ]


def test_ended_ray_sessions_are_pruned_but_a_running_or_recent_one_and_the_newest_stay(tmp_path):
    """Each local Ray leaves a session folder of logs in the private Ray folder; a schedule would
    pile them up without end. A folder a live process names (its raylet, GCS) stays."""
    import os
    import subprocess
    import time

    from flows.ray_start import prune_ray_sessions

    names = [f"session_2026-01-0{d}_00-00-00_000000_{d}" for d in range(1, 6)]
    for name in names:
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (time.time() - 7200, time.time() - 7200))
    os.utime(tmp_path / names[3], None)  # started a moment ago
    (tmp_path / "session_latest").symlink_to(tmp_path / names[-1])
    # A process naming the session on its command line, as a raylet does (python keeps its argv).
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", f"--session-dir={tmp_path / names[1]}"]
    running = subprocess.Popen(sleeper)
    while names[1].encode() not in Path(f"/proc/{running.pid}/cmdline").read_bytes():  # exec'd yet?
        time.sleep(0.01)
    try:
        assert prune_ray_sessions(tmp_path, keep=1) == [names[0], names[2]]
    finally:
        running.kill()
        running.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [names[1], names[3], names[4], "session_latest"]
