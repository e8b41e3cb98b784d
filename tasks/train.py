"""Drive the training cluster: start it, run a span of steps, checkpoint, register, validate.

These tasks run in the flow's process (they are called, not submitted): they hold the Ray actor
handles, while the work itself runs in the Ray actors, one per device_mapping entry.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from sft_core.cluster.cluster import Cluster
from sft_core.cluster.worker import WorkerInfo
from sft_core.config import SFTConfig
from sft_core.progress import bar, eta
from sft_core.strategies.registry import strategy_for
from sft_core.tracking import Trackers
from sft_core.tracking.mlflow_model import write_mlflow_model
from sft_core.tracking.mlflow_tracker import register_checkpoint
from sft_core.train import checkpoint as ckpt
from sft_core.train import metrics as m
from sft_core.train.artifacts import TrainArtifacts
from sft_core.train.run_folder import RunFolder


@task(name="start-cluster", cache_policy=NONE, persist_result=False)
def start_cluster(
    cfg: SFTConfig, cluster: Cluster, artifacts: TrainArtifacts, resume_state: str | None = None
) -> WorkerInfo:
    """Join the launched actors (`Cluster(cfg)`) into the training cluster and load the model,
    the data and, with `resume_state`, the exact state of a checkpoint. On failure the caller, which
    owns the cluster, shuts it down."""
    cluster.start(artifacts)
    info: WorkerInfo = cluster.execute_all("initialize", resume_state, label="initialize")[0]
    get_run_logger().info(
        "cluster '%s': %d workers on %s, %s parameters, %d steps (%d per epoch, %d packed rows); %s%s",
        cluster.name,
        cluster.world_size,
        info.device,
        f"{info.parameters:,}",
        info.total_steps,
        info.steps_per_epoch,
        info.train_rows,
        strategy_for(cfg).describe(cfg),
        "; freed host memory kept for reuse" if info.keeps_host_memory else "",
    )
    return info


@task(name="train-steps", cache_policy=NONE, persist_result=False, task_run_name="train-steps-{start}-{end}")
def train_steps(
    cluster: Cluster, start: int, end: int, total: int, logging_steps: int, trackers: Trackers
) -> dict[str, float]:
    """Optimizer steps start+1 .. end (1-based global steps) of `total`; metrics every logging_steps
    and at `end`, each log line with the run's progress and the time left at this pace."""
    logger = get_run_logger()
    metrics: dict[str, float] = {}
    began = time.perf_counter()
    for step in range(start, end):
        metrics = m.train_metrics(cluster.execute_all("train_step", step, label=f"step {step + 1}"))
        global_step = step + 1
        if global_step % logging_steps == 0 or global_step == end:
            trackers.log_metrics(metrics, global_step)
            pace = (time.perf_counter() - began) / (global_step - start)
            logger.info(
                "step %d/%d %s ETA %s | loss %.4f  grad_norm %.3f  lr %.2e  %.0f tok/s  %.2fs",
                global_step,
                total,
                bar(global_step, total),
                eta(pace * (total - global_step)),
                metrics[m.LOSS],
                metrics[m.GRAD_NORM],
                metrics[m.LR],
                metrics[m.TOKENS_PER_SEC],
                metrics[m.TIME_STEP],
            )
    return metrics


@task(name="val-step", cache_policy=NONE, persist_result=False)
def val_step(cluster: Cluster) -> dict[str, float]:
    return m.val_metrics(cluster.execute_all("val_step", label="validation"))


@dataclass(frozen=True)
class SavedCheckpoint:
    path: str  # the folder to register: the HF folder, or a LoRA run's merged model beside it
    adapter: str | None  # a LoRA run's adapter folder
    seconds: float  # the slowest rank's time to write it

    @classmethod
    def at(cls, checkpoint: Path, cluster_name: str, seconds: float = 0.0) -> SavedCheckpoint:
        """The folders of a published checkpoint (`checkpoint-<step>`)."""
        hf, merged = checkpoint / cluster_name, checkpoint / f"{cluster_name}-merged"
        adapter = (hf / "adapter_config.json").is_file()
        return cls(str(merged if merged.is_dir() else hf), str(hf) if adapter else None, seconds)


def _weights_readable_as_the_rest(folder: Path) -> None:
    """transformers writes safetensors files through a private temporary file (mode 0600) while the
    folder's other files follow the umask: the weights get the mode of its config files."""
    config = next(folder / n for n in ("config.json", "adapter_config.json") if (folder / n).is_file())
    mode = config.stat().st_mode & 0o777
    for weights in folder.glob("*.safetensors"):
        weights.chmod(mode)


@task(name="save-checkpoint", cache_policy=NONE, persist_result=False, task_run_name="save-checkpoint-{step}")
def save_checkpoint(
    cluster: Cluster, run_root: str, step: int, state: dict[str, Any], final: bool = False
) -> SavedCheckpoint:
    """Workers write into the run's staging folder; it is published whole (manifest, rename)."""
    run = RunFolder(Path(run_root))
    staged = run.staging(step)
    shutil.rmtree(staged, ignore_errors=True)  # left by a crash during an earlier save of this run
    ckpt.check_room(run, step)
    try:
        seconds = cluster.execute_all("do_checkpoint", str(staged), final, label=f"checkpoint at step {step}")
        for folder in (staged / cluster.name, staged / f"{cluster.name}-merged"):
            if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
                _weights_readable_as_the_rest(folder)
                # A full model or a LoRA adapter: an MLflow model too, named by where it is published.
                write_mlflow_model(folder, source=(run.checkpoint(step) / folder.name).resolve())
        path = ckpt.publish(run, step, state, cluster.world_size)
    except Exception as err:
        full = ckpt.failed_write(run, step)
        # Never used, and it may hold the disk's last blocks (MLflow must still end the run).
        shutil.rmtree(staged, ignore_errors=True)
        if full:
            raise full from err
        raise
    return SavedCheckpoint.at(path, cluster.name, max(seconds))


@task(name="prune-checkpoints", cache_policy=NONE, persist_result=False)
def prune_checkpoints(cfg: SFTConfig, run_root: str, tracking_uri: str) -> list[str]:
    """max_ckpt_to_keep over this run's own checkpoints; never its newest nor the registry's `best`.
    A removed checkpoint's registered versions are deleted with it, so none points at nothing."""
    if not cfg.max_ckpt_to_keep:
        return []
    from sft_core.tracking.mlflow_tracker import (
        best_version_source,
        delete_versions,
        versions_by_folder,
        write_whole,
    )

    run = RunFolder(Path(run_root))
    best = best_version_source(tracking_uri, cfg.exp_name)
    protected = {Path(best).parent} if best else set()
    # Every registry query before any folder goes: one failing after a removal would leave
    # registered versions pointing at nothing.
    versions_of = versions_by_folder(
        tracking_uri, cfg.exp_name, ckpt.checkpoints_in_run(run, complete_only=False)
    )

    def forget(path: Path) -> None:
        versions = versions_of.get(path, [])
        delete_versions(tracking_uri, cfg.exp_name, versions)
        # Versions uploaded to a tracking server do not point at the folder: they stay.
        with_versions = (
            f" and its registered version(s) {versions}" if versions else " (no version points at it)"
        )
        get_run_logger().info(
            "max_ckpt_to_keep=%d: removing %s%s", cfg.max_ckpt_to_keep, path.name, with_versions
        )

    # On the MLflow write thread: a stop (Ctrl-C, a cancel) lets the folders and their versions go
    # together before the stop's own writes.
    removed = write_whole(ckpt.prune, run, cfg.max_ckpt_to_keep, protected, forget)
    return [str(p) for p in removed]


def retry_unless_tracking_server_lost(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed registration, except when the tracking server stopped answering: MLflow's
    client has retried that for minutes already, and two more rounds would only hold the run."""
    from sft_core.tracking.mlflow_tracker import lost_tracking_server

    err = state.data if isinstance(state.data, BaseException) else None
    return lost_tracking_server(err, os.environ.get("MLFLOW_TRACKING_URI", "")) is None


@task(
    name="register-model",
    cache_policy=NONE,
    persist_result=False,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_unless_tracking_server_lost,
    task_run_name="register-model-step-{step}",
)
def register_model(
    tracking_uri: str,
    name: str,
    path: str,
    run_id: str,
    step: int,
    metrics: dict[str, float],
    tags: dict[str, str],
    description: str,
    best_metric: str,
    greater_is_better: bool,
) -> int:
    registered = register_checkpoint(
        tracking_uri, name, path, run_id, step, metrics, tags, description, best_metric, greater_is_better
    )
    get_run_logger().info(
        "registered %s version %d (step %d) from %s%s",
        name, registered.version, step, path,
        "; it is the new 'best'" if registered.is_best
        else f"; 'best' stays {registered.best_stays}" if registered.best_stays else "",
    )  # fmt: skip
    if registered.note:
        get_run_logger().warning("%s", registered.note)
    return registered.version
