"""The SFT pipeline flow: resolve model -> tokenizer -> encode -> pack -> train on Ray
(validate every eval_steps, checkpoint every save_steps and at the end) -> register in MLflow."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import ray
from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect.utilities.annotations import quote

from flows.artifacts import publish_run_artifacts
from flows.cancel_watch import cancel_from_the_server, ignore_further_sigterm
from flows.cluster_launch import ClusterLaunch
from flows.ray_runner import SFTRayTaskRunner, wait_for_ray
from flows.runtime import lost_prefect_api, mark_crashed
from flows.validate import run_validation
from sft_core.cluster.cluster import Cluster, WorkerFailure
from sft_core.config import SFTConfig
from sft_core.data.spec import SPLIT_ARGS, EncodeSpec
from sft_core.data.splits import EncodedSplit, PackedSplit
from sft_core.data.store import EncodedData, stored_digest
from sft_core.errors import ConfigError, exception_chain
from sft_core.model.prepared_tokenizer import PreparedTokenizer
from sft_core.preflight import load_run_config
from sft_core.secrets import literal_secret_overrides, redact
from sft_core.strategies.registry import strategy_for
from sft_core.tracking import Trackers
from sft_core.tracking.mlflow_tracker import (
    METRIC_DATA_TAG,
    MLflowTracker,
    checkpoint_version,
    default_tracking_uri,
    fail_if_running,
    lost_tracking_server,
    write_whole,
)
from sft_core.tracking.tensorboard import TensorBoardTracker
from sft_core.train import metrics as m
from sft_core.train.artifacts import SplitFiles, TrainArtifacts
from sft_core.train.checkpoint import latest_in_run, read_state
from sft_core.train.resume_checks import (
    check_data_fingerprint,
    check_global_batch,
    check_same_adapter,
    check_same_layout,
    check_same_model,
    check_training_args,
)
from sft_core.train.run_folder import (
    RunFolder,
    RunLock,
    died_holding,
    hold_start,
    plan_run,
    refuse_inside_a_checkpoint,
)
from tasks.caching import digest, file_digest
from tasks.data import encode_dataset, pack_dataset
from tasks.model import prepare_tokenizer, resolve_model
from tasks.train import (
    SavedCheckpoint,
    prune_checkpoints,
    register_model,
    save_checkpoint,
    start_cluster,
    train_steps,
)


def _existing(task: Any, **params: Any) -> Any:
    """Run a data task here, in the flow's process; if its result came from the cache but its files
    were deleted since, run it again. Here, not on Ray: a cache hit takes milliseconds, while a Ray
    task first waits for a worker process to start and import the project (seconds each)."""
    result = task(**params)
    if Path(result.path).exists():
        return result
    return task.with_options(refresh_cache=True)(**params)


def boundaries(total: int, eval_steps: int, save_steps: int, after: int = 0) -> list[int]:
    """Steps after which the loop stops to validate and/or checkpoint (always including the last).

    >>> boundaries(7, 3, 5), boundaries(7, 3, 5, after=5)
    ([3, 5, 6, 7], [6, 7])
    """
    stops = {s for s in range(1, total + 1) if s % eval_steps == 0 or s % save_steps == 0} | {total}
    return sorted(s for s in stops if s > after)


def prepare_data(
    cfg: SFTConfig, tokenizer: PreparedTokenizer
) -> tuple[dict[str, EncodedSplit], dict[str, PackedSplit]]:
    """Encode then pack every split (cached tasks); returns ({split: encoded}, {split: packed})."""
    splits = {"train": cfg.sft_train.data_args.files()}
    if cfg.validation_files:
        splits["validation"] = cfg.validation_files
    enc_params = {
        split: {"files": files, "tokenizer": tokenizer, "spec": EncodeSpec.from_config(cfg, split), "split": split,
                "workers": cfg.data_args_for(split).preprocessing_num_workers}
        for split, files in splits.items()
    }  # fmt: skip
    # Every encoding before packing, so a bad row surfaces as its own error.
    encoded = {split: _existing(encode_dataset, **p) for split, p in enc_params.items()}
    packing = cfg.sft_train.use_sequence_packing
    pack_params = {
        split: {"encoded": enc, "sequence_length": cfg.sequence_length, "packing": packing}
        for split, enc in encoded.items()
    }
    packed = {split: _existing(pack_dataset, **p) for split, p in pack_params.items()}
    return encoded, packed


def report_data(
    cfg: SFTConfig, encoded: dict[str, EncodedSplit], packed: dict[str, PackedSplit]
) -> dict[str, float]:
    """Log what the length and bad-row policies did; return the data metrics for the trackers."""
    logger = get_run_logger()
    metrics: dict[str, float] = {}
    for split, enc in encoded.items():
        if enc.truncated or enc.dropped:
            logger.warning("%s: %d samples truncated, %d dropped (longer than sequence_length=%d); listed in %s",
                           split, enc.truncated, enc.dropped, cfg.sequence_length, enc.report)  # fmt: skip
        if enc.rejected:
            logger.warning("%s: %d bad rows skipped (%s.on_bad_row=skip); each with its reason in %s",
                           split, enc.rejected, SPLIT_ARGS[split], enc.rejects)  # fmt: skip
        if enc.unread:
            (logger.warning if enc.unread_suspect else logger.info)("%s: %s", split, enc.unread)
        metrics.update({m.data_metric(split, k): v for k, v in enc.counts().items()})
    if "validation" in encoded:
        # A validation sample that is also a training sample (same tokens: a split drawn from data
        # with duplicates) makes val_loss reward memorising it, and `best` with it.
        leaked = EncodedData.load(encoded["validation"].path).count_in(
            EncodedData.load(encoded["train"].path).sample_digests()
        )
        metrics[m.data_metric("validation", "in_train")] = leaked
        if leaked:
            logger.warning("validation: %d of %d samples are also training samples (the same tokens), so "
                           "val_loss partly measures memorisation; deduplicate the splits",
                           leaked, encoded["validation"].samples)  # fmt: skip
    rows = packed["train"]
    logger.info("train: %d samples -> %d rows (padding %.1f%%)", rows.samples, rows.rows,
                100 * rows.padding_fraction)  # fmt: skip
    for split, plan in packed.items():
        metrics.update({m.data_metric(split, "rows"): plan.rows,
                        m.data_metric(split, "padding_fraction"): plan.padding_fraction})  # fmt: skip
    return metrics


def data_fingerprint(encoded: dict[str, EncodedSplit], packed: dict[str, PackedSplit]) -> str:
    """What the run trains on, by content: each split's encoded samples (tokens and labels) and its
    packing plan. Another file, template, tokenizer or encoding setting gives another value; an
    update of the pipeline's code that encodes and packs the same data does not."""
    return digest(
        sorted(
            (split, stored_digest(enc.path), file_digest(packed[split].path))
            for split, enc in encoded.items()
        )
    )


def lora_settings(cfg: SFTConfig) -> dict[str, Any] | None:
    """The LoRA settings a checkpoint records (None: full fine-tuning)."""
    lora = cfg.sft_train.model_args.lora
    return lora.model_dump() if lora else None


def parallel_layout(cfg: SFTConfig) -> dict[str, Any]:
    """The strategy, the format of its per-rank resume state and the layout that state is sharded
    by where a resume cannot reshard it (megatron's)."""
    strategy = strategy_for(cfg)
    return {
        "strategy_name": strategy.name,
        "state_format": strategy.state_format,
        "layout": strategy.state_layout(cfg),
    }


def check_resume_keeps(cfg: SFTConfig, checkpoint: Path, state: dict[str, Any], model_dir: str) -> list[str]:
    """Refuse (ConfigError naming the key) a resume that changes what the checkpoint's state fixes:
    the strategy's state format and layout, the model's shape, the LoRA adapter, the global batch,
    the optimizer's hyperparameters. Returns a warning line per allowed change."""
    check_same_layout(checkpoint, state, parallel_layout(cfg))
    check_same_model(checkpoint, state, model_dir, cfg.pretrain)
    t = cfg.sft_train.training_args
    check_global_batch(checkpoint, state, cfg.global_batch_size, (
        f"per_device_train_batch_size {t.per_device_train_batch_size} x gradient_accumulation_steps "
        f"{t.gradient_accumulation_steps} x {cfg.data_parallel_size} data-parallel worker(s)"
    ))  # fmt: skip
    return [
        *check_same_adapter(checkpoint, state, lora_settings(cfg)),
        *check_training_args(state, t.model_dump()),
    ]


def key_fingerprint(encoded: dict[str, EncodedSplit], packed: dict[str, PackedSplit]) -> str:
    """The fingerprint of checkpoints saved before it was taken by content: the encode cache keys,
    which cover the pipeline's data code too, and the plans' names."""
    return digest(sorted((split, enc.key, Path(packed[split].path).name) for split, enc in encoded.items()))


# What the data of a checkpoint is, kept in its trainer_state.json and tagged on its version.
DATA_TAGS = ("data_fingerprint", METRIC_DATA_TAG)


def metric_data(cfg: SFTConfig, encoded: dict[str, EncodedSplit]) -> str:
    """What `metric_for_best_model` is measured on, by content: the validation split's tokens and
    labels for a val_ metric, else the training split's. Versions whose values differ cannot be
    ranked against each other (another validation file, template, tokenizer or length), while a
    change of code or config that encodes the same data keeps them comparable."""
    split = (
        "validation" if cfg.metric_for_best_model.startswith("val_") and "validation" in encoded else "train"
    )
    return stored_digest(encoded[split].path)


def version_provenance(cfg: SFTConfig) -> dict[str, str]:
    """Tags every registered version carries: where it came from and how to find its run."""
    flow_run_id = str(get_run_context().flow_run.id)
    ui = os.environ.get("PREFECT_API_URL", "").removesuffix("/api")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"  # fmt: skip
    except OSError:
        commit = "unknown"
    config = json.dumps(redact(cfg.model_dump(exclude={"hydra"})), sort_keys=True, default=str)
    return {
        "config_hash": hashlib.sha256(config.encode()).hexdigest()[:16],
        "git_commit": commit,
        "prefect_flow_run": f"{ui}/runs/flow-run/{flow_run_id}" if ui else flow_run_id,
        "base_model": cfg.pretrain,
    }


def model_description(cfg: SFTConfig) -> str:
    which = "highest" if cfg.greater_is_better else "lowest"
    return (
        f"Supervised fine-tuning of {cfg.pretrain} on {', '.join(cfg.sft_train.data_args.files())} "
        f"(template {cfg.template}). Aliases: best = the {which} {cfg.metric_for_best_model} so far, "
        "last_saved = the newest version."
    )


def stopped_from_outside(err: BaseException) -> bool:
    """A stop, not a failure: a cancel (Prefect's TerminationSignal for the worker's SIGTERM), Ctrl-C,
    SystemExit; also when it surfaced inside Ray's C code as the cause of another error (a
    SystemError from ray.wait). Not the asyncio cancellation an I/O timeout is raised from (a
    frozen server's read timeout): that is a failure."""
    from prefect.exceptions import ExternalSignal

    return any(isinstance(e, KeyboardInterrupt | SystemExit | ExternalSignal) for e in exception_chain(err))


def report_crashed_holder(lock: RunLock, flow_run_id: str) -> None:
    """The folder's previous holder died holding it (SIGKILL, a lost machine): its flow run is set
    to Crashed, so that the UI shows it ended and offers Retry."""
    dead = (lock.crashed or {}).get("flow_run_id")
    if not dead or dead == flow_run_id:  # a retry of that very flow run: its own state is current
        return
    _set_crashed(dead, ended_why(lock.crashed or {}, lock.path.parent))


def ended_why(holder: dict[str, Any], folder: Path) -> str:
    """Why a run folder's holder never recorded its end: as it said when it left, else it died."""
    return holder.get("why") or f"its process (pid {holder.get('pid')}) died while training into {folder}"


def _set_crashed(flow_run: str, why: str) -> None:
    logger = get_run_logger()
    try:
        if mark_crashed(flow_run, why):
            logger.warning("flow run %s was still RUNNING although %s; set it to Crashed", flow_run, why)
    except Exception as err:  # the new run goes on regardless
        logger.warning("could not set flow run %s, which %s, to Crashed: %s", flow_run, why, err)


def report_runs_that_died(output_dir: str, current: RunFolder, mlflow_run: MLflowTracker) -> None:
    """Other run folders of output_dir whose process died holding them (SIGKILL, OOM) and that no
    run took over since: their flow run is set to Crashed and their MLflow run to FAILED, which
    nothing else would do (a run resuming such a folder does the first and continues the second)."""
    logger = get_run_logger()
    for run, holder in died_holding(output_dir, current.root):
        why = ended_why(holder, run.root)
        if flow_run := holder.get("flow_run_id"):
            _set_crashed(flow_run, why)
        mlflow_run_id = run.info().get("mlflow_run_id")
        if not mlflow_run_id or mlflow_run_id == mlflow_run.run_id:
            continue
        try:
            if fail_if_running(mlflow_run.tracking_uri, mlflow_run_id, why):
                logger.warning(
                    "MLflow run %s was still RUNNING although %s; set it to FAILED", mlflow_run_id, why
                )
        except Exception as err:  # the new run goes on regardless
            logger.warning("could not set MLflow run %s, which %s, to FAILED: %s", mlflow_run_id, why, err)


def start_tracking(
    cfg: SFTConfig, flow_run_id: str, run: RunFolder, state: dict[str, Any]
) -> tuple[MLflowTracker, Trackers]:
    """MLflow (a new run, or the one this run folder already logs to) and TensorBoard. A run folder
    branched from another run's checkpoint gets an MLflow run of its own: logging into the original
    would mix two histories (and skip the steps both have)."""
    log_dir = cfg.tracker_kwargs.get("log_dir", cfg.logging_dir)
    info = run.info()
    branched_from = info.get("branched_from")
    resume_run_id = info.get("mlflow_run_id") or (
        state.get("mlflow_run_id") if branched_from is None else None
    )
    tags = {"prefect.flow_run_id": flow_run_id, "sft.run_folder": str(run.root)}
    if branched_from:
        tags["sft.branched_from"] = branched_from

    def open_run() -> MLflowTracker:
        tracker = MLflowTracker(
            default_tracking_uri(cfg.output_dir),
            cfg.exp_name,
            str(Path(cfg.output_dir) / "mlflow" / "artifacts"),
            run_name=f"{cfg.exp_name}-{run.name}",
            tags=tags,
            resume_run_id=resume_run_id,
            resume_step=state.get("global_step", 0),
        )
        run.update_info(mlflow_run_id=tracker.run_id)
        return tracker

    # Created and recorded in one write: a stop that lands meanwhile still finds the run to end.
    mlflow_run = write_whole(open_run)
    step = state.get("global_step", 0)
    tensorboard = TensorBoardTracker(str(Path(log_dir) / run.name), purge_step=step + 1 if step else None)
    trackers = Trackers([mlflow_run, tensorboard])
    trackers.log_params(cfg.model_dump(exclude={"hydra"}))
    return mlflow_run, trackers


def end_unopened_tracking(cfg: SFTConfig, run: RunFolder, status: str, why: str) -> None:
    """End the MLflow run of a run whose trackers were never handed over (a stop or an error while
    they were opened): the one its folder names, created whole on the write thread, if RUNNING."""
    from mlflow import MlflowClient

    def end() -> None:
        run_id = run.info().get("mlflow_run_id")
        client = MlflowClient(default_tracking_uri(cfg.output_dir))
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "sft.failure", why)
            client.set_terminated(run_id, status=status)

    write_whole(end)


def register(
    cfg: SFTConfig,
    mlflow_run: MLflowTracker,
    saved: SavedCheckpoint,
    entry: dict[str, Any],
    tags: dict[str, str],
    description: str,
) -> int:
    """Register a saved checkpoint, tagged with the metrics of its history `entry`."""
    summary = {
        k.removeprefix(m.SUMMARY_PREFIX): v for k, v in entry.items() if k.startswith(m.SUMMARY_PREFIX)
    }
    if saved.adapter:
        tags = {**tags, "lora_adapter": saved.adapter}
    return register_model(
        mlflow_run.tracking_uri, cfg.exp_name, saved.path, mlflow_run.run_id, entry["step"], quote(summary),
        tags, description, cfg.metric_for_best_model, cfg.greater_is_better,
    )  # fmt: skip


def register_resumed(
    cfg: SFTConfig,
    run: RunFolder,
    resume: Path | None,
    state: dict[str, Any],
    mlflow_run: MLflowTracker,
    version_tags: dict[str, str],
    description: str,
) -> int | None:
    """The registered version of the checkpoint the run resumes from. One of the run's own that was
    saved but never registered (the run stopped in between: killed, a server lost) is registered
    now, so no checkpoint is left out of the registry. None for the pretrained model; for another
    run's checkpoint (a branch: that run's to register), the version that run registered, if any."""
    if resume is None:
        return None
    saved = SavedCheckpoint.at(resume, state.get("cluster_name", cfg.sft_train.name))
    step = state["global_step"]
    if not resume.is_relative_to(run.root):
        origin = state.get("mlflow_run_id")
        return (
            checkpoint_version(mlflow_run.tracking_uri, cfg.exp_name, saved.path, origin, step)
            if origin
            else None
        )
    found = checkpoint_version(mlflow_run.tracking_uri, cfg.exp_name, saved.path, mlflow_run.run_id, step)
    if found is not None:
        return found
    get_run_logger().warning(
        "%s was saved but never registered (its run stopped in between): registering it now", resume.name
    )
    entry = next((h for h in reversed(state.get("history", [])) if h.get("step") == step), {"step": step})
    tags = {**version_tags, **{k: state[k] for k in DATA_TAGS if k in state}}
    return register(cfg, mlflow_run, saved, entry, tags, description)


def train(
    cfg: SFTConfig,
    artifacts: TrainArtifacts,
    run: RunFolder,
    resume: Path | None,
    mlflow_run: MLflowTracker,
    trackers: Trackers,
    data_tags: dict[str, str],
    launch: ClusterLaunch,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Train to the last step from `resume` (or the pretrained model) on the launched actors;
    returns (history, checkpoints, total steps). A worker that dies or stops responding restarts the
    cluster from the run's newest checkpoint, up to sft_train.max_restarts times."""
    logger = get_run_logger()
    restarts = 0
    checkpoints: list[dict[str, Any]] = []
    version_tags, description = version_provenance(cfg), model_description(cfg)
    while True:
        state = read_state(resume) if resume else {}
        start = state.get("global_step", 0)
        history: list[dict[str, Any]] = state.get("history", [])
        cluster = None
        try:
            cluster = launch.take() if restarts == 0 else Cluster(cfg)
            info = start_cluster(
                cfg, cluster, artifacts.with_shared_dir(str(run.root)),
                str(resume / "train_state") if resume else None,
            )  # fmt: skip
            total = info.total_steps
            resumed = register_resumed(cfg, run, resume, state, mlflow_run, version_tags, description)
            if resume and start >= total:
                logger.info("the checkpoint at step %d already completes the run (%d steps)", start, total)
                checkpoints.append({"step": start, "path": str(resume / cluster.name), "version": resumed})
                return history, checkpoints, total
            val: dict[str, float] = {}
            if artifacts.validation and cfg.eval_at_start and start == 0:
                val = run_validation(cluster, 0, trackers)
                history.append({"step": 0, **val})
            step = start
            for end in boundaries(total, cfg.eval_steps, cfg.save_steps, after=start):
                metrics = train_steps(cluster, step, end, total, cfg.logging_steps, trackers)
                step = end
                history.append({"step": step, **metrics})
                val = {}  # a checkpoint is tagged (and ranked for `best`) only by its own validation
                if artifacts.validation and (step % cfg.eval_steps == 0 or step == total):
                    val = run_validation(cluster, step, trackers)
                    history[-1].update(val)
                if step % cfg.save_steps == 0 or step == total:
                    state = {
                        "global_step": step,
                        "cluster_name": cluster.name,
                        "mlflow_run_id": mlflow_run.run_id,
                        **data_tags,
                        "data_fingerprint_by": "content",
                        "global_batch_size": cfg.global_batch_size,
                        "lora": lora_settings(cfg),
                        "parallel": parallel_layout(cfg),
                        "training_args": cfg.sft_train.training_args.model_dump(),
                        "history": history,
                    }
                    # quote(): plain values, no lineage. Prefect links inputs to the runs that made
                    # them by object id (recycled ids included), and a subflow run as a task input
                    # makes the default UI's Task Runs tab list nothing ("Invalid TaskInputResponse").
                    saved = save_checkpoint(cluster, str(run.root), step, quote(state), final=step == total)
                    trackers.log_metrics({m.TIME_CHECKPOINT: saved.seconds}, step)
                    tags = {**version_tags, **data_tags}
                    version = register(cfg, mlflow_run, saved, history[-1], tags, description)
                    checkpoints.append({"step": step, "path": saved.path, "version": version})
                    if cfg.max_ckpt_to_keep:
                        prune_checkpoints(cfg, str(run.root), mlflow_run.tracking_uri)
            return history, checkpoints, total
        except WorkerFailure as err:
            if restarts >= cfg.sft_train.max_restarts:
                raise
            restarts += 1
            resume = latest_in_run(run) or resume
            trackers.continue_after(read_state(resume)["global_step"] if resume else 0)
            logger.warning(
                "%s; restarting the cluster (restart %d of sft_train.max_restarts=%d) from %s",
                err, restarts, cfg.sft_train.max_restarts, resume or "the pretrained model",
            )  # fmt: skip
        except BaseException as err:
            # Stopped from outside (a cancel's SIGTERM, Ctrl-C): the actors go at once, without waiting
            # on Ray's release; the MLflow run is closed next, then Ray is shut down.
            if stopped_from_outside(err):
                ignore_further_sigterm()
                if cluster is not None:
                    cluster.shutdown(wait=False)
                    cluster = None
            raise
        finally:
            if cluster is not None:
                cluster.shutdown()


@flow(name="sft-pipeline", task_runner=SFTRayTaskRunner(), log_prints=True)
def sft_pipeline(
    config_name: str = "sft_config",
    overrides: list[str] | None = None,
    config_path: str | None = None,
    working_dir: str | None = None,
) -> dict[str, Any]:
    """`working_dir`: where the config's relative paths start (`sft run` gives its cwd, so that a
    retry started from anywhere finds the same files and run folder); unset: this process's cwd (a
    deployment's, set by prefect.yaml)."""
    # `prefect flow-run cancel` reaches a run that `sft run` started in its own process too.
    with cancel_from_the_server(str(get_run_context().flow_run.id)):
        return _pipeline(config_name, overrides or [], config_path, working_dir)


def _pipeline(
    config_name: str, overrides: list[str], config_path: str | None, working_dir: str | None
) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_run_config(config_name, overrides, config_path, Path(working_dir) if working_dir else None)
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        wait_for_ray()  # joining a cluster: quick, and a wrong address fails before any data work
    connected = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    if cfg.ray_address and connected and cfg.ray_address.split(":")[-1] != connected.split(":")[-1]:
        raise ConfigError(
            f"config key 'ray_address': {cfg.ray_address} is not the Ray cluster this flow run joined "
            f"({connected}), which RAY_ADDRESS={os.environ.get('RAY_ADDRESS')} in the environment chose; "
            "unset one of them."
        )
    if exposed := literal_secret_overrides(overrides):
        logger.warning(
            "the overrides %s hold secrets in plain text, now stored with this flow run's parameters; "
            "pass them as '${oc.env:NAME}' with NAME set in the worker's environment instead",
            exposed,
        )
    os.environ.update(cfg.system_envs)

    model_dir = resolve_model(cfg.pretrain)
    # The model against the strategy's layout, before data work and workers start.
    strategy_for(cfg).preflight(cfg, model_dir)
    launch = ClusterLaunch(cfg)  # the actors start while the data and MLflow are prepared
    try:
        return _prepare_and_train(cfg, model_dir, launch)
    except BaseException as err:
        if stopped_from_outside(err):  # before training began: the launched actors go at once
            ignore_further_sigterm()
            launch.discard(wait=False)
        raise
    finally:
        launch.discard()


def _prepare_and_train(cfg: SFTConfig, model_dir: str, launch: ClusterLaunch) -> dict[str, Any]:
    logger = get_run_logger()
    tokenizer = prepare_tokenizer(model_dir)
    encoded, packed = prepare_data(cfg, tokenizer)
    data_metrics = report_data(cfg, encoded, packed)
    files = {split: SplitFiles(encoded[split].path, packed[split].path) for split in encoded}
    artifacts = TrainArtifacts(
        model_dir=model_dir,
        tokenizer_dir=tokenizer.tokenizer_dir,
        train=files["train"],
        validation=files.get("validation"),
    )
    fingerprint = data_fingerprint(encoded, packed)
    data_tags = {"data_fingerprint": fingerprint, METRIC_DATA_TAG: metric_data(cfg, encoded)}

    flow_run_id = str(get_run_context().flow_run.id)
    log_dir = cfg.tracker_kwargs.get("log_dir", cfg.logging_dir)
    refuse_inside_a_checkpoint(
        log_dir, "tracker_kwargs.log_dir" if "log_dir" in cfg.tracker_kwargs else "logging_dir"
    )
    plan = plan_run(cfg.output_dir, cfg.resume_from_checkpoint, flow_run_id, pretrain=cfg.pretrain)
    logger.info("run folder %s: %s", plan.run.root, plan.why)
    with hold_start(plan):  # another run's checkpoint: kept from that run's pruning while this one lives
        # What the checkpoint allows, checked before the run folder is touched: a refused resume writes nothing.
        state = read_state(plan.resume) if plan.resume else {}
        if plan.resume:
            logger.info("resuming from %s (global step %d)", plan.resume, state.get("global_step", 0))
            from sft_core.train.dcp_metadata import (
                check_checkpoint_index,
            )  # torch.distributed.checkpoint: 1.3 s

            check_checkpoint_index(plan.resume / "train_state")
        warning = check_data_fingerprint(
            state, fingerprint, cfg.resume_data_check, legacy=lambda: key_fingerprint(encoded, packed)
        )
        if warning:
            logger.warning("%s; continuing (resume_data_check: warn)", warning)
        for change in check_resume_keeps(cfg, plan.resume, state, model_dir) if plan.resume else []:
            logger.warning("%s", change)
        with RunLock(plan.run, {"flow_run_id": flow_run_id}) as lock:
            plan.run.record_flow_run(flow_run_id)  # only once it is ours: a refused run writes nothing
            report_crashed_holder(lock, flow_run_id)
            status = "FAILED"
            server_lost = False
            opened: tuple[MLflowTracker, Trackers] | None = None
            try:
                opened = mlflow_run, trackers = start_tracking(cfg, flow_run_id, plan.run, state)
                report_runs_that_died(cfg.output_dir, plan.run, mlflow_run)
                trackers.log_metrics(data_metrics, 0)
                history, checkpoints, total = train(
                    cfg, artifacts, plan.run, plan.resume, mlflow_run, trackers, data_tags, launch
                )
                status = "FINISHED"
            except BaseException as err:
                if stopped_from_outside(err):
                    ignore_further_sigterm()
                    status = "KILLED"
                elif lost_api := lost_prefect_api(err):
                    lock.leave_named(
                        f"the Prefect server stopped answering during the run ({type(lost_api).__name__}: "
                        f"{str(lost_api) or 'no answer'}), so its flow run "
                        f"could not be ended; the run stopped with its newest checkpoint in {plan.run.root}"
                    )
                tracking_uri = default_tracking_uri(cfg.output_dir)
                server_lost = lost_tracking_server(err, tracking_uri) is not None
                if opened is None and not server_lost:
                    try:
                        end_unopened_tracking(cfg, plan.run, status, f"{type(err).__name__} while it started")
                    except Exception as end_err:  # the run's own failure is the one to report
                        logger.warning("the MLflow run could not be ended %s: %s", status, end_err)
                raise
            finally:
                # A tracking server that just failed after MLflow's minutes of retries is not asked
                # again to end the run: it stays RUNNING, and the resume continues it.
                try:
                    if opened is not None:
                        opened[1].close(status, skip=opened[0] if server_lost else None)
                except Exception as err:
                    if status == "FINISHED" or not lost_tracking_server(err, opened[0].tracking_uri):
                        raise
                    # The run's own failure is the one to report.
                    logger.warning(
                        "the MLflow run %s could not be ended %s: %s", opened[0].run_id, status, err
                    )
            final = checkpoints[-1]
            publish_run_artifacts(
                cfg.exp_name,
                history,
                f"Final checkpoint: `{final['path']}` (registered version {final['version']} of "
                f"`{cfg.exp_name}`); run folder `{plan.run.root}`; MLflow run `{mlflow_run.run_id}`.",
            )

    # The newest value of metric_for_best_model, with its step: not every step is evaluated.
    metric = m.SUMMARY_PREFIX + cfg.metric_for_best_model
    return {
        "exp_name": cfg.exp_name,
        "flow_run_id": flow_run_id,
        "checkpoints": checkpoints,
        "final_checkpoint": checkpoints[-1]["path"],
        "mlflow_tracking_uri": mlflow_run.tracking_uri,
        "mlflow_run_id": mlflow_run.run_id,
        "mlflow_experiment_id": mlflow_run.experiment_id,
        "registered_model": cfg.exp_name,
        "model_version": checkpoints[-1]["version"],
        "tensorboard_dir": cfg.tracker_kwargs.get("log_dir", cfg.logging_dir),
        "final_metrics": history[-1] if history else {},
        "metric_for_best_model": cfg.metric_for_best_model,
        "last_metric": next(((h["step"], h[metric]) for h in reversed(history) if metric in h), None),
        "run_folder": str(plan.run.root),
        "total_steps": total,
    }
