"""End to end on the real stack: Prefect server, Ray cluster on loopback, 2 workers, MLflow registry."""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import checkpoint_path, run_cli, run_folders

pytestmark = pytest.mark.slow


def flow_run_id(stdout: str) -> str:
    return re.search(r"runs/flow-run/([0-9a-f-]{36})", stdout).group(1)


def task_states(run_id: str) -> dict[str, str]:
    """Task run name -> state name, for every task of the flow run and its subflows, from the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    async def read() -> dict[str, str]:
        async with get_client() as client:
            subflows = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
            )
            ids = [run_id, *(str(f.id) for f in subflows)]
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            return {t.name: t.state.name for t in runs}

    return asyncio.run(read())


def heartbeats(run_id: str) -> dict[str, int]:
    """How many heartbeat events the flow run ("flow run") and each of its subflows (by name) sent."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    async def read() -> dict[str, int]:
        async with get_client() as client:
            runs = [await client.read_flow_run(run_id)]
            runs += await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id]))
            )
            page = await client.read_events(
                filter=EventFilter(
                    occurred=EventOccurredFilter(since=datetime.now(UTC) - timedelta(hours=1)),
                    event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
                    resource=EventResourceFilter(id=[f"prefect.flow-run.{r.id}" for r in runs]),
                ),
                limit=50,  # the most the API returns in a page; a run sends a few
            )
            sent = [e.resource.id.removeprefix("prefect.flow-run.") for e in page.events]
            return {"flow run" if str(r.id) == run_id else r.name: sent.count(str(r.id)) for r in runs}

    return asyncio.run(read())


def task_input_kinds(run_id: str) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> set[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
            return {type(x).__name__ for t in runs for v in t.task_inputs.values() for x in v}

    return asyncio.run(read())


def flow_run_artifacts(run_id: str) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read() -> dict[str, str]:
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
            return {a.key: a.type for a in found}

    return asyncio.run(read())


def flow_run_parameters(run_id: str) -> dict:
    from prefect.client.orchestration import get_client

    async def read() -> dict:
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).parameters

    return asyncio.run(read())


def smoke(tmp_path: Path, data: Path, *extra: str):
    out = tmp_path / "out"
    args = [
        "run", "+experiment=smoke",
        f"output_dir={out}", f"logging_dir={out}/tb",
        f"sft_train.data_args.file_name={data}/train.jsonl",
        f"validation.data_args.file_name={data}/validation.jsonl",
        *extra,
    ]  # fmt: skip
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, out


def test_smoke_pipeline_end_to_end_then_cached_rerun_then_changed_data(
    prefect_server, tmp_path, demo_copy, monkeypatch
):
    import mlflow
    import mlflow.transformers
    import torch
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Data no other test has encoded (the encode cache is keyed by content, not by path).
    for split in ("train", "validation"):
        with (demo_copy / f"{split}.jsonl").open("a") as f:
            f.write(
                json.dumps({"instruction": f"Say {uuid.uuid4().hex}", "input": "", "output": "Done."}) + "\n"
            )
    with (demo_copy / "validation.jsonl").open("a") as f:  # skipped by validation's own policy
        f.write(json.dumps({"instruction": "An unanswered question"}) + "\n")
    val_skip = "+validation.data_args.on_bad_row=skip"
    secret = f"hf_{uuid.uuid4().hex}"
    first, out = smoke(tmp_path, demo_copy, val_skip, f"+system_envs.HF_TOKEN={secret}")
    run_id = flow_run_id(first.stdout)
    # Its parameters name where its relative paths start: a retry from another folder finds them.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).parameters["working_dir"] == str(tmp_path)
    # The console: training progress with a bar and the time left; each encoding's row account.
    console = first.stdout + first.stderr
    assert re.search(r"Task run 'train-steps-3-6' - step 6/6 \[#{20}\] 100% ETA 0:00:00 \| loss", console)
    assert re.search(
        r"Task run 'encode-validation' - \d+ rows read -> \d+ samples \(1 bad rows skipped", console
    )

    # Prefect: every stage ran and was recorded on OUR server (a Ray worker with its own temporary
    # server would leave its task runs elsewhere), validation ran as a subflow 3 times.
    states = task_states(run_id)
    for name in ("resolve-model", "load-tokenizer", "encode-train", "encode-validation", "pack-train",
                 "train-steps-0-3", "train-steps-3-6", "save-checkpoint-3", "save-checkpoint-6",
                 "register-model-step-3", "register-model-step-6"):  # fmt: skip
        assert any(n.startswith(name) for n in states), f"{name} missing from {sorted(states)}"
    assert all(s == "Completed" for s in states.values()), states
    assert sum(n.startswith("val-step") for n in states) == 3
    # Heartbeats: the flow run sends them (crash detection); the validate subflows, inline in its
    # process, send none (a heartbeat thread cost each up to a second at its end).
    sent = heartbeats(run_id)
    for _ in range(50):  # the server stores events a moment after they are sent
        if sent["flow run"] >= 1:
            break
        time.sleep(0.2)
        sent = heartbeats(run_id)
    assert sent["flow run"] >= 1, sent
    validations = {name: n for name, n in sent.items() if name.startswith("validate-step-")}
    assert sorted(validations) == ["validate-step-0", "validate-step-3", "validate-step-6"], sent
    assert not any(validations.values()), sent
    # The default Prefect UI lists task runs only if no task input is a subflow run.
    assert "FlowRunResult" not in task_input_kinds(run_id), task_input_kinds(run_id)
    # The flow run's page: a metrics table and the loss chart as artifacts.
    kinds = flow_run_artifacts(run_id)
    assert kinds.get("smoke-sft-metrics") == "table" and kinds.get("smoke-sft-loss") == "markdown", kinds

    # Checkpoints: Hugging Face folders at the seed's layout, loadable, generating.
    for step in (3, 6):
        assert (checkpoint_path(out, step) / "sft_train" / "model.safetensors").is_file()
    final = checkpoint_path(out, 6) / "sft_train"
    # The weights as readable as the folder's other files; MLmodel names where the model is.
    assert (final / "model.safetensors").stat().st_mode & 0o777 == (
        final / "config.json"
    ).stat().st_mode & 0o777
    assert f"source_model_name: {final.resolve()}\n" in (final / "MLmodel").read_text()
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    state = json.loads((checkpoint_path(out, 6) / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["history"][-1]["step"] == 6

    # MLflow: params, metrics per logging step, every checkpoint registered, alias latest.
    uri = f"sqlite:///{out}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("smoke-sft", "last_saved")
    assert str(mv.version) == "2" and mv.tags["global_step"] == "6"
    for tag in ("val_loss", "loss", "data_fingerprint", "metric_data", "config_hash", "git_commit"):
        assert mv.tags.get(tag), tag
    assert mv.tags["prefect_flow_run"].endswith(f"/runs/flow-run/{run_id}")
    best = client.get_model_version_by_alias("smoke-sft", "best")
    v1 = client.get_model_version("smoke-sft", "1")
    assert v1.tags["metric_data"] == mv.tags["metric_data"]  # one validation set: ranked against each other
    assert float(best.tags["val_loss"]) == min(float(v1.tags["val_loss"]), float(mv.tags["val_loss"]))
    assert "embedded:tiny-smollm2" in client.get_registered_model("smoke-sft").description
    run = client.get_run(mv.run_id)
    assert run.data.params["sft_train.strategy_args.strategy_name"] == "ddp_train"
    assert run.data.tags["prefect.flow_run_id"] == run_id
    loss = client.get_metric_history(mv.run_id, "sft_train/loss")
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6]
    assert all(m.value > 0 for m in loss)
    assert [m.step for m in client.get_metric_history(mv.run_id, "sft_train/val_loss")] == [0, 3, 6]
    # Bad rows are counted per split: the validation file's one skipped row, none in training.
    assert run.data.metrics["data/validation_rejected"] == 1 and run.data.metrics["data/rejected"] == 0
    assert run.data.metrics["data/validation_in_train"] == 0  # the demo splits share no sample
    for name in ("sft_train/grad_norm", "sft_train/lr", "sft_train/tokens_per_sec", "sft_train/mfu",
                 "sft_train/pad_ratio", "time/data", "time/fwd_bwd", "time/optimizer", "time/comm", "sft_train/supervised_tokens", "time/step_train", "time/val",
                 "time/checkpoint"):  # fmt: skip
        assert client.get_metric_history(mv.run_id, name), name
    # Through the environment, restored after the test (mlflow.set_tracking_uri would leak it into
    # every later subprocess); models:/ URIs are resolved against the registry there.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fetched = mlflow.artifacts.download_artifacts("models:/smoke-sft@latest", dst_path=str(tmp_path / "dl"))
    reloaded = AutoModelForCausalLM.from_pretrained(fetched)
    served = mlflow.transformers.load_model("models:/smoke-sft@last_saved")  # a real MLflow model
    assert served("Hi", max_new_tokens=2)[0]["generated_text"].startswith("Hi")
    torch.testing.assert_close(
        reloaded.state_dict()["model.norm.weight"], model.state_dict()["model.norm.weight"]
    )
    events = list((out / "tb").glob("*/events.out.tfevents.*"))  # a TensorBoard run per run folder
    assert events and {e.parent.name for e in events} <= {r.name for r in run_folders(out)}

    # The secret reached no store: MLflow params, TensorBoard, the Prefect flow run's parameters.
    assert run.data.params["system_envs.HF_TOKEN"] == "***"
    assert all(secret not in v for v in run.data.params.values())
    assert all(secret.encode() not in f.read_bytes() for f in events)
    assert secret not in json.dumps(flow_run_parameters(run_id))
    # ... nor Ray's logs of the run (its runtime_env agent writes the actors' environment there).
    ray_logs = [f for f in Path(tempfile.gettempdir(), "ray").glob("session_*/logs/**/*") if f.is_file()]
    assert ray_logs and not [f for f in ray_logs if secret.encode() in f.read_bytes()]

    # The data again: encoding and packing come from the cache. Only the data stages matter from
    # here on, so the reruns train one step on one worker; their cache keys hold the data and how
    # it is encoded and packed, not how long or on how many workers it is trained.
    # They run as a sweep of two learning rates (`sft run --multirun`): a run each, one after the
    # other, into the same output_dir, both from the cache.
    rerun = (val_skip, "sft_train.training_args.max_steps=1", "sft_train.device_mapping=[0]")
    second, _ = smoke(
        tmp_path, demo_copy, *rerun, "--multirun", "sft_train.training_args.learning_rate=1e-3,1e-2"
    )
    swept_runs = re.findall(r"runs/flow-run/([0-9a-f-]{36})", second.stdout)
    assert len(swept_runs) == 2, second.stdout[-3000:]
    for swept in swept_runs:
        states = task_states(swept)
        for name in ("encode-train", "encode-validation", "pack-train", "pack-validation"):
            assert states[name] == "Cached", (name, states)
    assert len(run_folders(out)) == 3
    # Each its own MLflow run with its own learning rate and registered versions; `best` ranks all
    # versions measured on this validation set, the sweep's and the first run's.
    lrs = {client.get_run(client.get_model_version("smoke-sft", str(v)).run_id).data.params[
        "sft_train.training_args.learning_rate"] for v in (3, 4)}  # fmt: skip
    assert lrs == {"0.001", "0.01"}, lrs
    versions = client.search_model_versions("name='smoke-sft'")
    assert len(versions) == 4 and {v.tags["metric_data"] for v in versions} == {mv.tags["metric_data"]}
    best = client.get_model_version_by_alias("smoke-sft", "best")
    assert float(best.tags["val_loss"]) == min(float(v.tags["val_loss"]) for v in versions)
    summary = second.stdout[second.stdout.index("==== sweep: 2 of 2 run(s) ran, 0 failed") :]
    for version, lr in ((3, "0.001"), (4, "0.01")):
        row = next(line for line in summary.splitlines() if f"models:/smoke-sft/{version}" in line)
        assert lr in row and "(step 1)" in row, summary

    # A changed training file is encoded again; the unchanged validation file is still cached.
    with (demo_copy / "train.jsonl").open("a") as f:
        f.write(json.dumps({"instruction": "One more row", "input": "", "output": "Indeed."}) + "\n")
    third, _ = smoke(tmp_path, demo_copy, *rerun)
    states = task_states(flow_run_id(third.stdout))
    assert states["encode-train"] == "Completed" and states["encode-validation"] == "Cached", states


def test_a_base_model_trained_with_a_chat_template_stops_at_its_end_of_turn(
    prefect_server, tmp_path, demo_copy, tiny_model_dir
):
    """A base model's generation config names only its end-of-text token (SmolLM2, Qwen2.5 base):
    trained with chatml, every answer ends with <|im_end|>, which the checkpoint must stop at."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    GenerationConfig(bos_token_id=1, eos_token_id=0).save_pretrained(base)
    _, out = smoke(tmp_path, demo_copy, f"pretrain={base}", "sft_train.data_args.template=chatml",
                   "sft_train.training_args.max_steps=2", "save_steps=2", "eval_steps=2")  # fmt: skip
    final = checkpoint_path(out, 2) / "sft_train"
    end_of_turn = AutoTokenizer.from_pretrained(final).convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(final).eos_token_id == [0, end_of_turn]
