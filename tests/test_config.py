"""The config is strict: every mistake names its key; seed-shaped configs load with the same meaning."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sft_core.config import check_runnable, parse_device_mapping, validate_config
from sft_core.config_loader import load_config
from sft_core.errors import ConfigError

HERE = Path(__file__).parent


def load(*overrides: str, **kw):
    return load_config("sft_config", list(overrides), **kw)


def test_default_config_loads_with_absolute_paths():
    cfg = load()
    assert cfg.pretrain == "embedded:smollm2-135m-instruct"
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in cfg.sft_train.data_args.files())
    assert cfg.sft_train.device_mapping == [0, 1]
    assert cfg.global_batch_size == 2


def test_a_data_file_pattern_is_the_files_it_matches_when_the_run_starts(tmp_path, monkeypatch):
    from sft_core.errors import DataError
    from sft_core.preflight import preflight

    shards = tmp_path / "shards"
    (shards / "more").mkdir(parents=True)
    for name in ("b.jsonl", "a.jsonl", "more/c.jsonl", "notes.txt", "x[1].jsonl", "x1.jsonl"):
        (shards / name).write_text('{"instruction": "q", "output": "a"}\n')
    monkeypatch.chdir(tmp_path)  # relative patterns resolve from where the command runs
    cfg = load(
        "sft_train.data_args.file_name=shards/*.jsonl", "validation.data_args.file_name=shards/**/c.jsonl"
    )
    assert cfg.sft_train.data_args.files() == [
        str(shards / n) for n in ("a.jsonl", "b.jsonl", "x1.jsonl", "x[1].jsonl")
    ]
    assert cfg.validation_files == [str(shards / "more" / "c.jsonl")]
    # A name that exists is itself, brackets and all (as a pattern it would mean x1.jsonl).
    assert load(f"sft_train.data_args.file_name='{shards}/x[1].jsonl'").sft_train.data_args.files() == [
        str(shards / "x[1].jsonl")
    ]
    (shards / "d.jsonl").write_text('{"instruction": "q", "output": "a"}\n')  # a shard added later: read then
    assert (
        str(shards / "d.jsonl")
        in load("sft_train.data_args.file_name=shards/*.jsonl").sft_train.data_args.files()
    )
    with pytest.raises(
        DataError, match=r"shards/\*\.parquet' matches no file \(set by config key 'sft_train"
    ):
        preflight(load("sft_train.data_args.file_name=shards/*.parquet", f"output_dir={tmp_path}/out"))
    with pytest.raises(DataError, match="give a pattern such as"):
        preflight(load(f"sft_train.data_args.file_name={shards}", f"output_dir={tmp_path}/out"))
    # An entry written twice is read twice (as written); a file two different entries reach is refused.
    twice = load(
        "sft_train.data_args.file_name=[shards/a.jsonl,shards/a.jsonl,shards/m*/*.jsonl,shards/m*/*.jsonl]"
    )
    assert (
        twice.sft_train.data_args.files()
        == [str(shards / "a.jsonl")] * 2 + [str(shards / "more/c.jsonl")] * 2
    )
    for overlap in (
        "[shards/*.jsonl,shards/a.jsonl]",
        "[shards/a.jsonl,shards/*.jsonl]",
        "[shards/*.jsonl,shards/a*.jsonl]",
    ):
        with pytest.raises(ConfigError, match=(
            r"config key 'sft_train.data_args.file_name': file '.*shards/a.jsonl' is matched by both '.*' and "
            r"'.*', so it would be read twice"
        )):  # fmt: skip
            load(f"sft_train.data_args.file_name={overlap}")


def test_misspelled_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        load("+sft_train.training_args.learning_rat=1e-4")
    assert "sft_train.training_args.learning_rat" in str(err.value)
    assert "did you mean 'learning_rate'" in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("eval_steps=0", "eval_steps"),
        ("save_steps=-1", "save_steps"),
        ("sft_train.training_args.learning_rate=abc", "sft_train.training_args.learning_rate"),
        ("sft_train.training_args.per_device_train_batch_size=0", "per_device_train_batch_size"),
        ("sft_train.device_mapping='list(range(0,2)); import os'", "sft_train.device_mapping"),
        ("sft_train.model_args.dtype=fp8", "sft_train.model_args.dtype"),
        ("sft_train.training_args.max_steps=0", "sft_train.training_args"),
        ("seed=-1", "config key 'seed': Input should be greater than or equal to 0 (got -1)"),
    ],
)
def test_impossible_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load(override)
    assert key in str(err.value)


def test_device_mapping_larger_than_the_machine_stops_before_workers_start():
    cfg = load("sft_train.device_mapping='list(range(0,8))'")
    with pytest.raises(
        ConfigError, match=r"sft_train.device_mapping.*needs 8 cpu devices but this machine has 2"
    ):
        check_runnable(cfg, devices=("cpu", 2))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("list(range(0,8))", list(range(8))),
        ("list(range(2, 6, 2))", [2, 4]),
        ("[0, 3]", [0, 3]),
        ([1], [1]),
        (2, [2]),
    ],
)
def test_device_mapping_forms_are_parsed_without_eval(value, expected):
    assert parse_device_mapping(value) == expected


@pytest.mark.parametrize("bad", ["__import__('os').system('true')", "[0, 0]", "[-1]", "[]"])
def test_device_mapping_rejects_code_and_nonsense(bad):
    with pytest.raises(ValueError):
        parse_device_mapping(bad)


def test_seed_shaped_config_loads_with_the_same_meaning(tmp_path):
    cfg = load_config(
        "sft_config", [], config_path=str(HERE / "configs" / "seed_megatron"), base_dir=tmp_path
    )
    assert cfg.seed == 7 and cfg.sequence_length == 1024
    assert cfg.track_with == "tensorboard"
    assert cfg.tracker_kwargs["log_dir"] == str(tmp_path / "out" / "tensorboard")
    assert cfg.output_dir == str(tmp_path / "out" / "ckpt")
    assert cfg.system_envs == {"SOME_FLAG": "1"}
    assert cfg.num_gpus_per_node == 8
    assert cfg.sft_train.model_args.dtype == "bf16"
    assert cfg.sft_train.device_mapping == list(range(8))
    assert cfg.strategy_config.tensor_model_parallel_size == 2
    assert cfg.template == "qwen2_5"
    # 8 workers = TP 2 x PP 2 x CP 2: one data-parallel replica.
    assert cfg.data_parallel_size == 1
    assert cfg.global_batch_size == 2 * 16 * 1
    layout = cfg.strategy_config
    assert layout.sequence_parallel and layout.use_distributed_optimizer and layout.context_parallel_size == 2
    # Context parallelism needs Transformer Engine's attention: refused before any worker starts.
    with pytest.raises(ConfigError, match="context_parallel_size.*Transformer Engine"):
        check_runnable(cfg, devices=("cuda", 8))


def test_global_template_wins_over_data_args_template():
    assert load("global_template=chatml").template == "chatml"
    assert load("sft_train.data_args.template=qwen2_5").template == "qwen2_5"


@pytest.mark.parametrize("tracker", ["wandb", "swanlab"])
def test_recognised_but_unsupported_tracker_says_what_to_use(tracker):
    with pytest.raises(ConfigError, match=r"track_with.*not supported.*Use track_with: mlflow"):
        load(f"track_with={tracker}")


def test_unknown_strategy_lists_supported_ones():
    with pytest.raises(ConfigError, match=r"DeepSpeed is not part of this project.*Supported: ddp_train"):
        load("sft_train.strategy_args.strategy_name=deepspeed_train")


def test_smoke_experiment_composes():
    cfg = load("+experiment=smoke")
    assert cfg.pretrain == "embedded:tiny-smollm2"
    assert cfg.sft_train.world_size == 2
    assert cfg.sft_train.training_args.max_steps // cfg.save_steps >= 2
    assert cfg.sft_train.training_args.max_steps // cfg.eval_steps >= 2


def test_bad_override_syntax_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot compose"):
        load("sft_train.training_args.learning_rate")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("exp_name=team/model", "exp_name"),
        ("exp_name=a:b", "exp_name"),
        ("sft_train.data_args.template=chatml3", "unknown template 'chatml3'"),
        ("global_template=no_such", "unknown template 'no_such'"),
    ],
)
def test_names_the_registry_or_a_template_cannot_take_stop_at_config_time(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config("sft_config", ["+experiment=smoke", override])


def test_data_policies_are_listed_so_overrides_need_no_plus():
    cfg = load_config(
        "sft_config",
        ["sft_train.data_args.on_bad_row=skip", "sft_train.data_args.format=sharegpt",
         "sft_train.data_args.supervise=last_assistant_turn"],
    )  # fmt: skip
    args = cfg.sft_train.data_args
    assert (args.on_bad_row, args.format, args.supervise) == ("skip", "sharegpt", "last_assistant_turn")


def test_a_config_is_checked_once_per_process_whoever_asks(monkeypatch):
    """The CLI checks before it starts a server; the flow it then runs in the same process gets the
    same config without checking again. Another config is checked on its own."""
    from sft_core import preflight as pf

    checked = []
    monkeypatch.setattr(pf, "preflight", lambda cfg: checked.append(cfg.seed))
    monkeypatch.setattr(pf, "_checked", set())
    first = pf.load_run_config("sft_config", ["seed=7"])
    again = pf.load_run_config("sft_config", ["seed=7"])
    pf.load_run_config("sft_config", ["seed=8"])
    assert first == again and checked == [7, 8]


def with_value(key: str, value) -> dict:
    """The default config as a plain dict with one top-level key set (no Hydra parsing of the value)."""
    return {**load().model_dump(), key: value}


NAME_RULES = (
    "cannot name an MLflow registered model (no '/', ':' or '%', not both ' and \", not '.' or starting "
    "with '..', not empty); use letters, digits, '-', '_' or '.'"
)


@pytest.mark.parametrize("name", ["..", ".", "...v2", "..x", " "])
def test_an_exp_name_mlflow_would_read_as_a_path_is_refused_at_config_time(name):
    with pytest.raises(ConfigError, match=re.escape(f"config key 'exp_name': '{name}' {NAME_RULES}")):
        validate_config(with_value("exp_name", name))


def test_an_exp_name_longer_than_every_mlflow_store_takes_is_refused_at_config_time(tmp_path):
    """MLflow's validator takes 500 characters, but Postgres/MySQL stores keep a run name in 250, and
    the run is named '<exp_name>-<run folder>'."""
    from mlflow.store.tracking.dbmodels.models import SqlRun

    from sft_core.train.run_folder import new_run

    run = new_run(tmp_path, "0123456789abcdef-" + "f" * 19)
    longest = "x" * 200
    validate_config(with_value("exp_name", longest))
    assert len(f"{longest}-{run.name}-99") <= SqlRun.__table__.c.name.type.length == 250
    with pytest.raises(ConfigError, match=re.escape("config key 'exp_name': 201 characters, more than 200")):
        validate_config(with_value("exp_name", "x" * 201))


@pytest.mark.parametrize(
    "name", ["..", ".", "...v2", "..x", "a..b", ".hidden", "a.", "x" * 200, "x" * 501, " "]
)
def test_exp_name_takes_what_mlflow_takes_for_an_experiment_and_a_registered_model(name):
    """The same rules as MLflow's own checks, which run only when the run creates the experiment and
    registers its first checkpoint (after training); lengths 201-500 are the one difference (above)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_experiment_name, _validate_model_name

    try:
        _validate_experiment_name(name)
        _validate_model_name(name)
        mlflow_takes = True
    except MlflowException:
        mlflow_takes = False
    try:
        validate_config(with_value("exp_name", name))
        config_takes = True
    except ConfigError:
        config_takes = False
    assert config_takes == mlflow_takes


METRICS = (
    "loss, grad_norm, lr, tokens_per_sec, supervised_tokens_per_sec, supervised_tokens, mfu, pad_ratio, "
    "skipped_steps, epoch, val_loss, val_supervised_tokens"
)


@pytest.mark.parametrize(
    ("name", "hint"),
    [("eval_loss", " (did you mean 'val_loss'?)"), ("sft_train/eval_loss", " (did you mean 'val_loss'?)"),
     ("time/step_train", "")],
)  # fmt: skip
def test_a_metric_for_best_model_no_checkpoint_is_tagged_with_is_refused(name, hint):
    with pytest.raises(ConfigError, match=re.escape(
        f"config key 'metric_for_best_model': '{name}' is not a metric a checkpoint is tagged with{hint}; "
        f"use one of {METRICS}"
    )):  # fmt: skip
        load(f"metric_for_best_model={name}")


def test_metric_for_best_model_as_the_mlflow_ui_names_it_is_the_same_metric():
    assert load("metric_for_best_model=sft_train/val_loss").metric_for_best_model == "val_loss"
    assert load("metric_for_best_model=sft_train/loss").metric_for_best_model == "loss"


@pytest.mark.parametrize("no_validation", ["validation=null", "validation.data_args.file_name=null"])
def test_a_validation_metric_without_a_validation_split_is_refused_saying_what_to_set(no_validation):
    with pytest.raises(ConfigError, match=re.escape(
        "config key 'metric_for_best_model': 'val_loss' is measured on the validation split and this "
        "config has none (validation is null or names no file), so `best` would never move; set "
        "metric_for_best_model=loss, or give validation.data_args.file_name"
    )):  # fmt: skip
        load(no_validation)
    assert load(no_validation, "metric_for_best_model=loss").metric_for_best_model == "loss"
    # Not set at all: the default follows the splits there are.
    assert load(no_validation, "~metric_for_best_model").metric_for_best_model == "loss"
    assert load("~metric_for_best_model").metric_for_best_model == "val_loss"


def test_the_metric_names_the_config_takes_are_those_a_checkpoint_is_tagged_with():
    """What the pipeline tags a registered version with: the step's and validation's metrics under
    SUMMARY_PREFIX, without it."""
    from sft_core.train import metrics as m
    from sft_core.train.stats import EvalSums, RankStep, StepStats

    stats = StepStats(loss_sum=1.0, targets=1, grad_norm=1.0, lr=1e-5, skipped_steps=0, time_fwd_bwd=0.1,
                      time_optimizer=0.1)  # fmt: skip
    step = RankStep(rank=0, stats=stats, num_targets=1, tokens=2, real_tokens=2, flops=1.0, peak_flops=1.0,
                    time_data=0.1, time_step=0.1, epoch=0, peak_memory_mb=1.0)  # fmt: skip
    logged = {**m.train_metrics([step]), **m.val_metrics([EvalSums(1.0, 1)])}
    tagged = [k.removeprefix(m.SUMMARY_PREFIX) for k in logged if k.startswith(m.SUMMARY_PREFIX)]
    assert sorted(tagged) == sorted(m.TRAIN_SUMMARY + m.VAL_SUMMARY) == sorted(METRICS.split(", "))


@pytest.mark.parametrize(
    ("config_path", "overrides"),
    [(None, []), (None, ["+experiment=smoke"]), (None, ["+experiment=smoke_lora"]),
     ("smollm2-135M-sft_ddp", []), ("smollm2-135M-sft_megatron", []), (str(HERE / "configs" / "seed_megatron"), [])],
)  # fmt: skip
def test_every_shipped_config_validates(config_path, overrides):
    """conf/ (also as prefect.yaml's deployments use it), examples/ and the seed-shaped test config."""
    assert load_config("sft_config", overrides, config_path=config_path).metric_for_best_model == "val_loss"


@pytest.mark.parametrize(
    "key", ["sft_train.training_args.learning_rate", "sft_train.training_args.num_train_epochs",
            "sft_train.training_args.max_grad_norm", "sft_train.worker_timeout_s"],
)  # fmt: skip
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_a_number_that_is_not_finite_is_refused_naming_its_key(key, value):
    """inf passed every bound: learning_rate=inf trained to nan and registered the model."""
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}': Input should be a finite number")):
        load_config("sft_config", [f"{key}={value}"])


def test_a_tracker_setting_that_is_not_read_is_refused():
    """tracker_kwargs was free-form: a misspelt log_dir sent TensorBoard to the default folder unseen."""
    with pytest.raises(ConfigError, match=r"config key 'tracker_kwargs': \['log_dirr'\] not read"):
        validate_config(with_value("tracker_kwargs", {"log_dirr": "x"}))
    validate_config(with_value("tracker_kwargs", {"log_dir": "x"}))


def test_a_config_folder_of_ones_own_sees_the_shipped_experiments_and_reference_config(tmp_path):
    """`--config-path` replaced the shipped conf/ on Hydra's search path: `+experiment=smoke` read as
    an unknown key, and `defaults: [sft_config]` could not be found."""
    (tmp_path / "mine.yaml").write_text("defaults:\n  - sft_config\n  - _self_\nseed: 7\n")
    cfg = load_config("mine", ["+experiment=smoke"], str(tmp_path))
    assert (cfg.seed, cfg.exp_name, cfg.pretrain) == (7, "smoke-sft", "embedded:tiny-smollm2")
    seed = load_config("sft_config", ["+experiment=smoke"], "smollm2-135M-sft_ddp")  # the seed's example
    assert seed.exp_name == "smoke-sft"
    # A folder's own search path is kept, before the shipped one.
    (tmp_path / "extra" / "experiment").mkdir(parents=True)
    (tmp_path / "extra" / "experiment" / "tiny.yaml").write_text("# @package _global_\nseed: 11\n")
    (tmp_path / "own.yaml").write_text(
        f"defaults:\n  - sft_config\n  - _self_\nhydra:\n  searchpath: ['file://{tmp_path / 'extra'}']\n"
    )
    assert load_config("own", ["+experiment=tiny"], str(tmp_path)).seed == 11
    assert load_config("own", ["+experiment=smoke"], str(tmp_path)).exp_name == "smoke-sft"


def test_the_seeds_device_mapping_unquoted_on_a_command_line_says_how_to_write_it():
    with pytest.raises(
        ConfigError, match=re.escape("""quote the seed's form, 'sft_train.device_mapping="list""")
    ):
        load_config("sft_config", ["sft_train.device_mapping=list(range(0,2))"])
    assert load_config(
        "sft_config", ['sft_train.device_mapping="list(range(0,2))"']
    ).sft_train.device_mapping == [0, 1]
