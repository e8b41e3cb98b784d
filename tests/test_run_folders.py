"""Each run owns its checkpoints: run folders, the lock, the manifest, pruning, resume decisions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft_core.errors import ConfigError
from sft_core.train import checkpoint as ckpt
from sft_core.train import resume_checks
from sft_core.train.run_folder import (
    RunFolder,
    RunFolderBusy,
    RunLock,
    find_run,
    plan_run,
    refuse_inside_a_checkpoint,
)


def fake_save(run: RunFolder, step: int, world_size: int = 2, fingerprint: str = "data-a") -> Path:
    """What the workers leave in the staging folder, then the driver's publish."""
    staged = run.staging(step)
    (staged / "sft_train").mkdir(parents=True)
    (staged / "sft_train" / "model.safetensors").write_bytes(b"w" * (100 + step))
    (staged / "train_state").mkdir()
    for rank in range(world_size):
        (staged / "train_state" / f"rank{rank}.pt").write_bytes(b"r" * 10)
    return ckpt.publish(run, step, {"global_step": step, "data_fingerprint": fingerprint}, world_size)


def test_flow_runs_of_one_scheduler_batch_get_folders_named_after_their_own_ids(tmp_path):
    """Prefect's flow run ids are UUIDv7: runs created in one batch share the first 8 hex digits."""
    ids = ["019af1c2-3b4d-7e5f-8a6b-1c2d3e4f5a6b", "019af1c2-3b4d-7e60-9b7c-2d3e4f5a6b7c"]
    names = [plan_run(str(tmp_path), False, i).run.name for i in ids]
    assert [n.rsplit("-", 1)[1] for n in names] == ["3e4f5a6b", "4f5a6b7c"]


def test_a_new_run_never_touches_the_checkpoints_of_an_earlier_one(tmp_path):
    first = plan_run(str(tmp_path), False, "aaaaaaaa-1111")
    fake_save(first.run, 3)
    before = (first.run.checkpoint(3) / "sft_train" / "model.safetensors").read_bytes()
    second = plan_run(str(tmp_path), False, "bbbbbbbb-2222")
    assert second.run.root != first.run.root and second.resume is None
    fake_save(second.run, 3)
    assert (first.run.checkpoint(3) / "sft_train" / "model.safetensors").read_bytes() == before
    with pytest.raises(FileExistsError):  # a published checkpoint is never replaced
        fake_save(RunFolder(second.run.root), 3)


def test_a_retry_of_a_flow_run_continues_in_its_own_folder_from_its_newest_checkpoint(tmp_path):
    first = plan_run(str(tmp_path), False, "aaaaaaaa-1111")
    fake_save(first.run, 2)
    fake_save(first.run, 4)
    plan_run(str(tmp_path), False, "bbbbbbbb-2222")  # another run in between
    retry = plan_run(str(tmp_path), False, "aaaaaaaa-1111")
    assert retry.run.root == first.run.root and retry.resume == first.run.checkpoint(4).resolve()
    assert find_run(str(tmp_path), "cccccccc-3333") is None


def test_resume_auto_continues_the_newest_run_and_an_older_checkpoint_branches(tmp_path):
    first = plan_run(str(tmp_path), False, "aaaaaaaa-1111")
    fake_save(first.run, 2)
    fake_save(first.run, 4)
    auto = plan_run(str(tmp_path), "auto", "bbbbbbbb-2222")
    assert auto.run.root == first.run.root and auto.resume == first.run.checkpoint(4).resolve()
    with RunLock(auto.run, {"flow_run_id": "bbbbbbbb-2222"}):  # as the flow does, once it holds the lock
        auto.run.record_flow_run("bbbbbbbb-2222")
    assert find_run(str(tmp_path), "bbbbbbbb-2222").root == first.run.root  # its retry finds it too
    branch = plan_run(str(tmp_path), str(first.run.checkpoint(2)), "cccccccc-3333")
    assert branch.run.root != first.run.root and branch.resume == first.run.checkpoint(2).resolve()
    assert branch.run.info()["branched_from"].endswith("checkpoint-2")


def test_an_incomplete_checkpoint_is_never_resumed_from(tmp_path):
    run = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    fake_save(run, 2)
    newest = fake_save(run, 4)
    (newest / "train_state" / "rank1.pt").unlink()  # a shard lost after publication
    assert ckpt.latest_in_run(run) == run.checkpoint(2).resolve()
    assert ckpt.resolve_resume("auto", str(tmp_path)) == run.checkpoint(2).resolve()
    with pytest.raises(ConfigError, match="incomplete"):
        ckpt.resolve_resume(str(newest), str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"checkpoint-3' does not exist \(a typo, or a checkpoint its run removed"
    ):
        ckpt.resolve_resume(str(run.checkpoint(3)), str(tmp_path))
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        ckpt.resolve_resume(str(run.root), str(tmp_path))
    staged = run.staging(6)  # one rank's state missing: refused before it is published
    (staged / "train_state").mkdir(parents=True)
    (staged / "train_state" / "rank0.pt").write_bytes(b"r")
    with pytest.raises(RuntimeError, match="1 rank state files for 2 workers"):
        ckpt.publish(run, 6, {}, world_size=2)
    assert not run.checkpoint(6).exists()


@pytest.mark.parametrize("how", ["auto", "retry"])
def test_a_damaged_newest_checkpoint_is_left_alone_and_the_run_branches(tmp_path, how):
    first = plan_run(str(tmp_path), False, "aaaaaaaa-1111")
    fake_save(first.run, 2)
    damaged = fake_save(first.run, 4)
    (damaged / "sft_train" / "model.safetensors").write_bytes(b"x")  # truncated after publication
    flow_run = "aaaaaaaa-1111" if how == "retry" else "bbbbbbbb-2222"
    plan = plan_run(str(tmp_path), "auto", flow_run)
    assert plan.run.root != first.run.root and plan.resume == first.run.checkpoint(2).resolve()
    assert "checkpoint-4" in plan.why and "damaged" in plan.why
    fake_save(plan.run, 4)  # training on from step 2 publishes its own checkpoint-4
    assert (damaged / "sft_train" / "model.safetensors").read_bytes() == b"x"  # left for inspection
    if how == "retry":  # a further retry continues the branch, not the damaged folder
        again = plan_run(str(tmp_path), False, flow_run)
        assert again.run.root == plan.run.root and again.resume == plan.run.checkpoint(4).resolve()


def test_an_output_dir_inside_a_published_checkpoint_is_refused(tmp_path):
    published = fake_save(plan_run(str(tmp_path), False, "aaaaaaaa-1111").run, 2)
    before = sorted(p.relative_to(published) for p in published.rglob("*"))
    for inside in (published, published / "sft_train" / "more"):
        with pytest.raises(ConfigError, match="inside the published checkpoint"):
            plan_run(str(inside), False, "bbbbbbbb-2222")
    with pytest.raises(ConfigError, match="config key 'logging_dir'.*inside the published checkpoint"):
        refuse_inside_a_checkpoint(str(published / "sft_train" / "tb"), "logging_dir")  # TensorBoard's
    refuse_inside_a_checkpoint(str(tmp_path / "tb"), "logging_dir")  # beside it: fine
    assert sorted(p.relative_to(published) for p in published.rglob("*")) == before


def test_pruning_keeps_the_newest_and_the_protected_and_only_touches_its_own_run(tmp_path):
    other = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    fake_save(other, 1)
    run = plan_run(str(tmp_path), False, "bbbbbbbb-2222").run
    for step in (2, 4, 6, 8):
        fake_save(run, step)
    forgotten = []  # what the registry is told, and whether the folder was still there then
    removed = ckpt.prune(run, 1, {run.checkpoint(4)}, lambda p: forgotten.append((p.name, p.is_dir())))
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-6"]
    assert forgotten == [("checkpoint-2", True), ("checkpoint-6", True)]  # versions first, then the folder
    assert [p.name for p in ckpt.checkpoints_in_run(run)] == ["checkpoint-4", "checkpoint-8"]
    assert ckpt.is_complete(other.checkpoint(1))


def test_a_link_placed_among_checkpoints_or_runs_is_never_pruned_through_nor_resumed(tmp_path):
    """A checkpoint or run "shared" into an output_dir by a link is not that run's: pruning it
    deleted the folder it pointed at (another run's checkpoint, or anything else)."""
    elsewhere = plan_run(str(tmp_path / "other_out"), False, "aaaaaaaa-1111").run
    shared = fake_save(elsewhere, 1)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    run = plan_run(str(tmp_path / "out"), False, "bbbbbbbb-2222").run
    fake_save(run, 2)
    fake_save(run, 4)
    (run.checkpoints_root / "checkpoint-1").symlink_to(shared)
    (run.checkpoints_root / "checkpoint-3").symlink_to(victim)
    (run.root.parent / "zzzz-linked-run").symlink_to(elsewhere.root)  # newest name: would be "latest"

    assert [p.name for p in ckpt.checkpoints_in_run(run, complete_only=False)] == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    assert ckpt.prune(run, 1) == [run.checkpoint(2).resolve()]
    assert (victim / "keep.txt").is_file() and ckpt.is_complete(shared)
    assert ckpt.latest_checkpoint(str(tmp_path / "out")) == run.checkpoint(4).resolve()
    assert find_run(str(tmp_path / "out"), "aaaaaaaa-1111") is None
    # runs/ itself on another disk, through a link: listed as ever.
    (tmp_path / "linked_out").mkdir()
    (tmp_path / "linked_out" / "runs").symlink_to(run.root.parent)
    assert ckpt.latest_checkpoint(str(tmp_path / "linked_out")) == run.checkpoint(4).resolve()
    assert find_run(str(tmp_path / "linked_out"), "bbbbbbbb-2222") is not None


def test_resume_over_changed_data_is_refused_or_warned(tmp_path):
    state = {"global_step": 4, "data_fingerprint": "a" * 32, "data_fingerprint_by": "content"}
    assert resume_checks.check_data_fingerprint(state, "a" * 32, "error", legacy=lambda: "x" * 32) is None
    with pytest.raises(ConfigError, match="resume_data_check"):
        resume_checks.check_data_fingerprint(state, "b" * 32, "error")
    assert "data differs" in resume_checks.check_data_fingerprint(state, "b" * 32, "warn")
    # Saved before fingerprints were taken by content: compared with the old kind, and a difference
    # may be a code update alone, which the message says.
    old = {"global_step": 4, "data_fingerprint": "k" * 32}
    assert resume_checks.check_data_fingerprint(old, "a" * 32, "error", legacy=lambda: "k" * 32) is None
    with pytest.raises(
        ConfigError, match=r"k{12} -> l{12}: .*or only the pipeline's code: this checkpoint was saved"
    ):
        resume_checks.check_data_fingerprint(old, "a" * 32, "error", legacy=lambda: "l" * 32)


def test_the_data_fingerprint_follows_the_data_not_the_code(tmp_path):
    """A code update changes every encode cache key (they cover the data code) but not what a run
    trains on: a resume after `git pull` must not be refused as "the data changed"."""
    import numpy as np

    from flows.sft_pipeline import data_fingerprint
    from sft_core.data.splits import EncodedSplit, PackedSplit
    from sft_core.data.store import EncodedData

    def split(key: str, tokens: list[int], plan: str) -> tuple[EncodedSplit, PackedSplit]:
        folder = tmp_path / key
        folder.mkdir()
        EncodedData.from_samples([np.array(tokens, dtype=np.int32)], [np.array(tokens, dtype=np.int32)]).save(
            folder / "encoded.npz"
        )
        (folder / "plan.json").write_text(plan)
        encoded = EncodedSplit("train", key, str(folder / "encoded.npz"), 1, 1, 3, 3, 0, 0, 0, "", "")
        return encoded, PackedSplit("train", str(folder / "plan.json"), 1, 1, 0.0)

    def fingerprint(key: str, tokens: list[int], plan: str = '{"rows": [[0]]}') -> str:
        encoded, packed = split(key, tokens, plan)
        return data_fingerprint({"train": encoded}, {"train": packed})

    same = fingerprint("key-before-update", [1, 2, 3])
    assert fingerprint("key-after-update", [1, 2, 3]) == same
    assert fingerprint("other-tokens", [1, 2, 4]) != same
    assert fingerprint("other-plan", [1, 2, 3], '{"rows": [[0], []]}') != same
    # A split saved before the digest was kept beside it gets it, the same, when first asked.
    kept = tmp_path / "key-after-update" / "encoded.digest"
    kept.unlink()
    encoded = EncodedSplit("train", "k", str(kept.with_suffix(".npz")), 1, 1, 3, 3, 0, 0, 0, "", "")
    packed = PackedSplit("train", str(kept.parent / "plan.json"), 1, 1, 0.0)
    assert data_fingerprint({"train": encoded}, {"train": packed}) == same and kept.is_file()


def test_resume_refuses_training_args_its_optimizer_state_would_override(tmp_path):
    from sft_core.config import TrainingArgs

    trained = TrainingArgs(learning_rate=1e-4, max_steps=10).model_dump()
    state = {"global_step": 4, "training_args": trained}
    assert resume_checks.check_training_args(state, trained) == []
    assert (
        resume_checks.check_training_args({"global_step": 4}, trained) == []
    )  # a checkpoint from before the record
    with pytest.raises(ConfigError, match=r"learning_rate 0\.0001 -> 1e-05.*start a new run"):
        resume_checks.check_training_args(state, TrainingArgs(learning_rate=1e-5, max_steps=10).model_dump())
    longer = resume_checks.check_training_args(
        state, TrainingArgs(learning_rate=1e-4, max_steps=20).model_dump()
    )
    assert longer == [
        "sft_train.training_args.max_steps changed from 10 to 20 since the checkpoint at step 4; "
        "it applies from there on"
    ]


def test_a_second_process_on_the_same_run_folder_is_stopped_naming_the_holder(tmp_path):
    run = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; from sft_core.train.run_folder import RunFolder, RunLock\n"
            f"with RunLock(RunFolder(Path({str(run.root)!r})), {{'flow_run_id': 'holder-flow-run'}}):\n"
            "    print('locked', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match="holder-flow-run") as err:
            RunLock(run, {"flow_run_id": "second"}).__enter__()
        assert f"flow run holder-flow-run, pid {holder.pid} on " in str(err.value) and " UTC" in str(
            err.value
        )
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    with RunLock(run, {"flow_run_id": "after"}) as lock:  # released by the kernel when the holder died
        assert json.loads((run.root / ".lock").read_text())["flow_run_id"] == "after"
        # The holder was killed holding it: the next one knows (its flow run is then set Crashed).
        assert lock.crashed is not None and lock.crashed["flow_run_id"] == "holder-flow-run"
        assert lock.crashed["pid"] == holder.pid
    with RunLock(run, {"flow_run_id": "next"}) as lock:  # "after" let go of it cleanly
        assert lock.crashed is None


def test_tensorboard_shows_a_resumed_run_once_per_step(tmp_path):
    """A run stopped after logging steps 1-5 and resumed from its checkpoint at step 3 logs steps
    4-5 again (a new process; or the same one, its cluster restarted): TensorBoard must show each
    step once, with the values of the run that went on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sft_core.tracking.tensorboard import TensorBoardTracker

    first = TensorBoardTracker(str(tmp_path / "run-a"))
    for step in range(1, 6):
        first.log_metrics({"loss": float(step)}, step)
    first.close()
    resumed = TensorBoardTracker(str(tmp_path / "run-a"), purge_step=3 + 1)
    for step in (4, 5, 6):
        resumed.log_metrics({"loss": 10.0 * step}, step)
    resumed.continue_after(5)  # a worker died after step 6: the cluster restarts from checkpoint-5
    resumed.log_metrics({"loss": 600.0}, 6)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "run-a"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 600.0)
    ]  # fmt: skip


def test_a_resume_must_keep_the_global_batch(tmp_path):
    """The resume's data position counts global batches: 2 workers x 2 rows resumed by 1 worker x
    2 rows would train rows of the epoch again and skip others. The same product is fine; a
    ddp/fsdp2 checkpoint saved before the size was recorded gives it by its rank files."""
    args = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}
    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "train_state").mkdir(parents=True)
    for rank in (0, 1):
        (checkpoint / "train_state" / f"rank{rank}.pt").write_bytes(b"")
    recorded = {"global_step": 4, "global_batch_size": 4, "training_args": args}
    legacy = {"global_step": 4, "training_args": args}
    for state in (recorded, legacy):
        assert resume_checks.saved_global_batch(checkpoint, state) == 4
        resume_checks.check_global_batch(
            checkpoint, state, 4, "2 x 2 x 1 worker"
        )  # e.g. accumulation 2, one worker
        with pytest.raises(ConfigError, match=(
            r"config key 'sft_train': the checkpoint at step 4 was trained with a global batch of 4 rows a "
            r"step, this config gives 2 \(how\)\. The data position of a resume counts global batches"
        )):  # fmt: skip
            resume_checks.check_global_batch(checkpoint, state, 2, "how")
    # Nothing recorded and no rank files that say it (megatron's): no check.
    assert resume_checks.saved_global_batch(tmp_path, legacy) is None
    resume_checks.check_global_batch(tmp_path, legacy, 2, "how")


def test_a_resume_into_a_model_of_another_shape_is_refused_naming_pretrain(tmp_path):
    """Two models that share a tokenizer (the data fingerprint matches) but not their shapes: the
    load would fail deep in torch with a size mismatch; it is refused up front instead."""
    import json

    checkpoint = tmp_path / "checkpoint-6"
    (checkpoint / "sft_train").mkdir(parents=True)
    tiny = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 49152}
    (checkpoint / "sft_train" / "config.json").write_text(json.dumps(tiny))
    same, other = tmp_path / "same", tmp_path / "other"
    for folder, config in (
        (same, {**tiny, "rope_theta": 1e5}),
        (other, {**tiny, "hidden_size": 576, "num_hidden_layers": 30}),
    ):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    state = {"global_step": 6, "cluster_name": "sft_train"}
    resume_checks.check_same_model(checkpoint, state, str(same), "my-model")  # other settings may differ
    with pytest.raises(ConfigError, match=(
        r"config key 'pretrain': the checkpoint at step 6 was trained from a model of another shape than "
        r"'embedded:smollm2-135m-instruct' \(hidden_size 64 -> 576, num_hidden_layers 2 -> 30\)"
    )):  # fmt: skip
        resume_checks.check_same_model(checkpoint, state, str(other), "embedded:smollm2-135m-instruct")


def test_a_resume_keeps_the_lora_adapters_it_saved(tmp_path):
    """Other target_modules dropped the adapters of the others unseen (28 tensors -> 8), another
    rank failed deep in DCP, LoRA switched on or off failed on missing keys: each is refused by key.
    Dropout and merge_at_end may change (logged)."""
    import json

    lora = {"rank": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear", "merge_at_end": True}
    checkpoint = tmp_path / "checkpoint-6"
    (checkpoint / "sft_train").mkdir(parents=True)
    state = {"global_step": 6, "cluster_name": "sft_train", "lora": lora}
    assert resume_checks.check_same_adapter(checkpoint, state, dict(lora)) == []
    assert resume_checks.check_same_adapter(checkpoint, state, {**lora, "dropout": 0.1}) == [
        "sft_train.model_args.lora.dropout changed from 0.0 to 0.1 since the checkpoint at step 6"
    ]
    for change, shown in (("target_modules", ["q_proj", "v_proj"]), ("rank", 16), ("alpha", 64.0)):
        with pytest.raises(ConfigError, match=(
            rf"config key 'sft_train.model_args.lora': the checkpoint at step 6 saved adapters with other "
            rf"settings \({change} {re.escape(str(lora[change]))} -> {re.escape(str(shown))}\)"
        )):  # fmt: skip
            resume_checks.check_same_adapter(checkpoint, state, {**lora, change: shown})
    with pytest.raises(ConfigError, match="was trained with LoRA adapters, this config trains without"):
        resume_checks.check_same_adapter(checkpoint, state, None)
    full = {"global_step": 6, "cluster_name": "sft_train", "lora": None}
    with pytest.raises(ConfigError, match="was trained without LoRA adapters, this config trains with"):
        resume_checks.check_same_adapter(checkpoint, full, lora)
    # Saved before the settings were recorded: the folder tells (an adapter's rank and alpha, or a full model).
    (checkpoint / "sft_train" / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16.0}))
    legacy = {"global_step": 6, "cluster_name": "sft_train"}
    assert resume_checks.check_same_adapter(checkpoint, legacy, dict(lora)) == []
    with pytest.raises(ConfigError, match=r"\(rank 8 -> 4\)"):
        resume_checks.check_same_adapter(checkpoint, legacy, {**lora, "rank": 4})
    (checkpoint / "sft_train" / "adapter_config.json").unlink()
    (checkpoint / "sft_train" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="was trained without LoRA adapters"):
        resume_checks.check_same_adapter(checkpoint, legacy, lora)


def test_a_resume_keeps_the_strategy_family_and_megatron_layout_its_state_was_sharded_by(tmp_path):
    """A megatron layout change failed in a worker after the cluster started (a 222-line log), a
    distributed optimizer's DP2 -> DP1 loaded half of Adam's state and crashed at the first step, a
    strategy change a bare FileNotFoundError: each is refused by key before anything starts.
    Recompute settings (memory only) may change; ddp_train and fsdp2_train share DCP's format."""
    from flows.sft_pipeline import parallel_layout
    from sft_core.config_loader import load_config

    def layout(strategy: str = "megatron_train", *overrides: str) -> dict:
        keys = [f"+sft_train.strategy_args.strategy_config.{o}" for o in overrides]
        return parallel_layout(
            load_config("sft_config", [f"sft_train.strategy_args.strategy_name={strategy}", *keys])
        )

    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "train_state").mkdir(parents=True)
    state = {"global_step": 4, "parallel": layout("megatron_train", "tensor_model_parallel_size=2")}
    resume_checks.check_same_layout(
        checkpoint,
        state,
        layout("megatron_train", "tensor_model_parallel_size=2", "recompute_granularity=selective"),
    )
    with pytest.raises(ConfigError, match=(
        r"config key 'sft_train.strategy_args.strategy_config': the checkpoint at step 4 holds each rank's "
        r"shards of another layout \(tensor_model_parallel_size 2 -> 1\)"
    )):  # fmt: skip
        resume_checks.check_same_layout(checkpoint, state, layout())
    sharded = {"global_step": 4, "parallel": layout("megatron_train", "use_distributed_optimizer=true")}
    resume_checks.check_same_layout(
        checkpoint, sharded, layout("megatron_train", "use_distributed_optimizer=true")
    )
    one_worker = parallel_layout(load_config("sft_config", [
        "sft_train.strategy_args.strategy_name=megatron_train", "sft_train.device_mapping=[0]",
        "+sft_train.strategy_args.strategy_config.use_distributed_optimizer=true",
    ]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"\(data_parallel_size 2 -> 1\)"):
        resume_checks.check_same_layout(checkpoint, sharded, one_worker)
    with pytest.raises(
        ConfigError, match=r"saved by megatron_train \(megatron resume state\), which ddp_train cannot"
    ):
        resume_checks.check_same_layout(checkpoint, state, layout("ddp_train"))
    torch_state = {"global_step": 4, "parallel": layout("fsdp2_train")}
    resume_checks.check_same_layout(
        checkpoint, torch_state, layout("ddp_train")
    )  # one format, resharded on load
    with pytest.raises(ConfigError, match=r"saved by fsdp2_train \(dcp resume state\), which megatron_train"):
        resume_checks.check_same_layout(checkpoint, torch_state, layout())
    # Saved before the layout was recorded: megatron's rank files tell the format.
    (checkpoint / "train_state" / "megatron_rank0.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"saved by an earlier run \(megatron resume state\)"):
        resume_checks.check_same_layout(checkpoint, {"global_step": 4}, layout("ddp_train"))
    resume_checks.check_same_layout(checkpoint, {"global_step": 4}, layout())  # the worker checks the layout


def test_resume_auto_never_forks_a_run_that_is_still_training(tmp_path):
    """`auto` reads every manifest before deciding: a live run that publishes meanwhile must not
    make the retry branch from its older checkpoint (a second training beside it), and a live run
    without a checkpoint yet must not be answered by a new run either."""
    live = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    with RunLock(live, {"flow_run_id": "aaaaaaaa-1111"}):
        with pytest.raises(
            RunFolderBusy,
            match=r"auto: run folder .* in use by another run \(flow run aaaaaaaa-1111.*no checkpoint yet",
        ):
            plan_run(str(tmp_path), "auto", "bbbbbbbb-2222")
        fake_save(live, 2)
        older = ckpt.latest_checkpoint(str(tmp_path))
        fake_save(live, 3)  # published between auto's choice and its check
        import sft_core.train.checkpoint as module

        chosen, module.latest_checkpoint = module.latest_checkpoint, lambda _: older
        try:
            with pytest.raises(
                RunFolderBusy, match=r"newest checkpoint belongs to run folder .*\(flow run aaaaaaaa-1111"
            ):
                plan_run(str(tmp_path), "auto", "bbbbbbbb-2222")
        finally:
            module.latest_checkpoint = chosen
    assert [p.name for p in ckpt.runs_root(str(tmp_path)).iterdir()] == [live.name]  # nothing written
    # Once it has stopped, a branch off an older checkpoint says nothing is damaged when nothing is.
    branch = plan_run(str(tmp_path), str(older), "bbbbbbbb-2222")
    assert "damaged" not in branch.why and branch.resume == older


def test_a_checkpoint_another_run_starts_from_is_not_pruned_under_it(tmp_path):
    from sft_core.errors import UserError
    from sft_core.train.run_folder import hold_start, pinned

    owner = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    for step in (2, 4, 6):
        fake_save(owner, step)
    branch = plan_run(str(tmp_path), str(owner.checkpoint(2)), "bbbbbbbb-2222")
    with hold_start(branch):
        assert [p.name for p in ckpt.prune(owner, 1)] == ["checkpoint-4"]  # 2 is held
        assert owner.checkpoint(2).is_dir()
    assert [p.name for p in ckpt.prune(owner, 1)] == ["checkpoint-2"]  # released: the next prune takes it
    assert not list(owner.root.glob(".pin-*"))  # its pin file went with it
    with (
        pytest.raises(UserError, match=r"checkpoint-2 was removed by its own run's max_ckpt_to_keep"),
        pinned(owner.checkpoint(2)),
    ):
        pass
    assert not list(owner.root.glob(".pin-*"))  # a pin that found nothing leaves nothing
    own = plan_run(str(tmp_path), "auto", "cccccccc-3333")  # continuing the owner itself: nothing to hold
    assert own.run.root == owner.root and not list(owner.root.glob(".pin-*"))
    with hold_start(own):
        assert not list(owner.root.glob(".pin-*"))


def test_a_retry_of_a_branch_that_saved_nothing_starts_again_from_where_it_branched(tmp_path):
    """A branch refused or stopped before its first checkpoint: its flow run's retry finds the
    folder, and must start from the checkpoint it branched from, not from the pretrained model."""
    owner = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    fake_save(owner, 2)
    fake_save(owner, 4)
    branch = plan_run(str(tmp_path), str(owner.checkpoint(2)), "bbbbbbbb-2222")
    retry = plan_run(str(tmp_path), False, "bbbbbbbb-2222")
    assert retry.run.root == branch.run.root and retry.resume == owner.checkpoint(2).resolve()
    assert "starting again from" in retry.why
    import shutil

    shutil.rmtree(owner.checkpoint(2))  # pruned meanwhile: said, not trained from scratch
    with pytest.raises(ConfigError, match=r"checkpoint-2' does not exist"):
        plan_run(str(tmp_path), False, "bbbbbbbb-2222")


def test_looking_for_a_live_run_never_makes_a_run_taking_its_folder_fail(tmp_path):
    """`auto` asks whether a run folder is in use; asking by taking its lock for an instant made a
    run taking that folder at the same moment find it busy (217 of 2000 in the review)."""
    import threading

    from sft_core.train.run_folder import live_holder

    run = plan_run(str(tmp_path), False, "aaaaaaaa-1111").run
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            live_holder(run)

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        for _ in range(500):
            with RunLock(run, {"flow_run_id": "aaaaaaaa-1111"}):
                pass
    finally:
        stop.set()
        asker.join()
    with RunLock(run, {"flow_run_id": "aaaaaaaa-1111"}):
        assert "flow run aaaaaaaa-1111" in live_holder(run)
    assert live_holder(run) is None
