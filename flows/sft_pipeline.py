"""The SFT pipeline flow: resolve model -> tokenizer -> encode -> pack -> train on Ray
(validate every eval_steps, checkpoint every save_steps and at the end) -> register in MLflow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import get_run_context
from prefect_ray import RayTaskRunner

from flows.validate import validate
from sft_core.config import SFTConfig, check_runnable
from sft_core.config_loader import load_config
from sft_core.tracking import Trackers
from sft_core.tracking.mlflow_tracker import MLflowTracker, default_tracking_uri
from sft_core.tracking.tensorboard import TensorBoardTracker
from sft_core.train.checkpoint import read_state, resolve_resume
from tasks.data import encode_dataset, pack_dataset
from tasks.model import prepare_tokenizer, resolve_model
from tasks.train import register_model, save_checkpoint, start_cluster, train_steps


def ray_task_runner() -> RayTaskRunner:
    """Join RAY_ADDRESS when set (multi-node), else start a local Ray on loopback."""
    address = os.environ.get("RAY_ADDRESS")
    if address:
        return RayTaskRunner(address=address)
    return RayTaskRunner(
        init_kwargs={
            "num_cpus": max(2, os.cpu_count() or 2),
            "include_dashboard": False,
            "log_to_driver": True,
            "configure_logging": True,
            "logging_level": "warning",
        }
    )


def encode_settings(cfg: SFTConfig, config_key: str) -> dict[str, Any]:
    """The part of the config that encoding depends on (and so its cache key)."""
    return {
        "template": cfg.template,
        "fields": {
            "prompt_key": cfg.prompt_key,
            "response_key": cfg.response_key,
            "query_key": cfg.query_key,
            "system_key": cfg.system_key,
            "format": cfg.sft_train.data_args.format,
        },
        "on_bad_row": cfg.sft_train.data_args.on_bad_row,
        "supervise": cfg.sft_train.data_args.supervise,
        "truncate_keep_end_token": cfg.sft_train.data_args.truncate_keep_end_token,
        "sequence_length": cfg.sequence_length,
        "length_policy": cfg.sft_train.data_args.length_policy,
        "config_key": config_key,
    }


def _existing(task: Any, future: Any, **params: Any) -> dict[str, Any]:
    """The task's result; if it came from the cache but its files were deleted, run it again."""
    result = future.result()
    if Path(result["path"]).exists():
        return result
    return task.with_options(refresh_cache=True).submit(**params).result()


def boundaries(total: int, eval_steps: int, save_steps: int, after: int = 0) -> list[int]:
    """Steps after which the loop stops to validate and/or checkpoint (always including the last).

    >>> boundaries(7, 3, 5), boundaries(7, 3, 5, after=5)
    ([3, 5, 6, 7], [6, 7])
    """
    stops = {s for s in range(1, total + 1) if s % eval_steps == 0 or s % save_steps == 0} | {total}
    return sorted(s for s in stops if s > after)


@flow(name="sft-pipeline", task_runner=ray_task_runner(), log_prints=True)
def sft_pipeline(
    config_name: str = "sft_config", overrides: list[str] | None = None, config_path: str | None = None
) -> dict[str, Any]:
    logger = get_run_logger()
    cfg = load_config(config_name, overrides or [], config_path)
    check_runnable(cfg)
    os.environ.update(cfg.system_envs)

    model_dir = resolve_model.submit(cfg.pretrain).result()
    tokenizer = prepare_tokenizer.submit(model_dir).result()
    splits = {"train": ("sft_train.data_args.file_name", cfg.sft_train.data_args.files())}
    if cfg.validation_files:
        splits["validation"] = ("validation.data_args.file_name", cfg.validation_files)
    enc_params = {
        split: {
            "files": files,
            "tokenizer": tokenizer,
            "settings": encode_settings(cfg, key),
            "split": split,
            "workers": cfg.sft_train.data_args.preprocessing_num_workers,
        }
        for split, (key, files) in splits.items()
    }
    futures = {split: encode_dataset.submit(**p) for split, p in enc_params.items()}
    # Wait on every encoding before packing, so a bad row surfaces as its own error.
    encoded = {split: _existing(encode_dataset, futures[split], **p) for split, p in enc_params.items()}
    pack_params = {
        split: {
            "encoded": enc,
            "sequence_length": cfg.sequence_length,
            "packing": cfg.sft_train.use_sequence_packing,
        }
        for split, enc in encoded.items()
    }
    futures = {split: pack_dataset.submit(**p) for split, p in pack_params.items()}
    packed = {split: _existing(pack_dataset, futures[split], **p) for split, p in pack_params.items()}
    train_enc, val_enc = encoded["train"], encoded.get("validation")
    train_pack, val_pack = packed["train"], packed.get("validation")
    for enc in filter(None, (train_enc, val_enc)):
        if enc["truncated"] or enc["dropped"]:
            logger.warning(
                "%s: %d samples truncated, %d dropped (longer than sequence_length=%d); listed in %s",
                enc["split"],
                enc["truncated"],
                enc["dropped"],
                cfg.sequence_length,
                enc["report"],
            )
        if enc["rejected"]:
            logger.warning(
                "%s: %d bad rows skipped (on_bad_row=skip); each with its reason in %s",
                enc["split"],
                enc["rejected"],
                enc["rejects"],
            )
    logger.info(
        "train: %d samples -> %d rows (padding %.1f%%)",
        train_pack["samples"],
        train_pack["rows"],
        100 * train_pack["padding_fraction"],
    )

    artifacts = {
        "model_dir": model_dir,
        "tokenizer_dir": tokenizer["tokenizer_dir"],
        "train_encoded": train_enc["path"],
        "train_plan": train_pack["path"],
        "val_encoded": val_enc["path"] if val_enc else None,
        "val_plan": val_pack["path"] if val_pack else None,
    }
    flow_run_id = str(get_run_context().flow_run.id)
    resume = resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    state = read_state(resume) if resume else {}
    start = state.get("global_step", 0)
    if resume:
        logger.info("resuming from %s (global step %d)", resume, start)
    tracking_uri = default_tracking_uri(cfg.output_dir)
    mlflow_run = MLflowTracker(
        tracking_uri,
        cfg.exp_name,
        str(Path(cfg.output_dir) / "mlflow" / "artifacts"),
        run_name=f"{cfg.exp_name}-{flow_run_id[:8]}",
        tags={"prefect.flow_run_id": flow_run_id},
        resume_run_id=state.get("mlflow_run_id"),
        resume_step=start,
    )
    tb_dir = cfg.tracker_kwargs.get("log_dir", cfg.logging_dir)
    trackers = Trackers([mlflow_run, TensorBoardTracker(tb_dir)])
    trackers.log_params(cfg.model_dump(exclude={"hydra"}))
    data_metrics = {
        "data/train_samples": train_enc["samples"],
        "data/train_rows": train_pack["rows"],
        "data/truncated": train_enc["truncated"],
        "data/dropped": train_enc["dropped"],
        "data/rejected": train_enc["rejected"],
        "data/padding_fraction": train_pack["padding_fraction"],
    }
    trackers.log_metrics(data_metrics, 0)

    cluster, info = start_cluster(cfg, artifacts, str(resume / "train_state") if resume else None)
    total = info["total_steps"]
    history: list[dict[str, Any]] = state.get("history", [])
    checkpoints: list[dict[str, Any]] = []
    status = "FAILED"
    try:
        val: dict[str, float] = {}
        if val_enc and cfg.eval_at_start and start == 0:
            val = validate(cluster, 0, trackers)
            history.append({"step": 0, **val})
        step = start
        for end in boundaries(total, cfg.eval_steps, cfg.save_steps, after=start):
            metrics = train_steps(cluster, step, end, cfg.logging_steps, trackers)
            step = end
            history.append({"step": step, **metrics})
            if val_enc and (step % cfg.eval_steps == 0 or step == total):
                val = validate(cluster, step, trackers)
                history[-1].update(val)
            if step % cfg.save_steps == 0 or step == total:
                saved = save_checkpoint(cluster, cfg, step, history, mlflow_run.run_id)
                trackers.log_metrics({"time/checkpoint": saved["time"]}, step)
                summary = {
                    k.split("/")[-1]: v for k, v in {**metrics, **val}.items() if k.startswith("sft_train/")
                }
                version = register_model(
                    tracking_uri, cfg.exp_name, saved["path"], mlflow_run.run_id, step, summary
                )
                checkpoints.append({"step": step, "path": saved["path"], "version": version})
        status = "FINISHED"
    finally:
        cluster.shutdown()
        mlflow_run.close(status)
        trackers.trackers[1].close()

    return {
        "exp_name": cfg.exp_name,
        "flow_run_id": flow_run_id,
        "checkpoints": checkpoints,
        "final_checkpoint": checkpoints[-1]["path"],
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_run_id": mlflow_run.run_id,
        "mlflow_experiment_id": mlflow_run.experiment_id,
        "registered_model": cfg.exp_name,
        "model_version": checkpoints[-1]["version"],
        "tensorboard_dir": tb_dir,
        "final_metrics": history[-1],
        "total_steps": total,
    }
