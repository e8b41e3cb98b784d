"""`sft run --multirun`: the expansion of Hydra's sweep syntax, and the checks made before any run
starts. The sweep itself, run end to end, is in tests/test_pipeline.py."""

from __future__ import annotations

import pytest

from flows.cli import main
from flows.sweep import expand, plan, print_sweep_summary
from sft_core.errors import ConfigError

LR = "sft_train.training_args.learning_rate"


def test_every_combination_in_hydras_order_and_other_overrides_kept_as_typed():
    typed = ["+experiment=smoke", f"{LR}=1e-4,3e-5", "seed=range(1,3)", "system_envs.X=${oc.env:HOME}",
             "tags='a,b'", "sft_train.device_mapping=[0,1]"]  # fmt: skip
    jobs = expand(typed)
    assert [j.swept for j in jobs] == [
        {LR: "0.0001", "seed": "1"}, {LR: "0.0001", "seed": "2"},
        {LR: "3e-05", "seed": "1"}, {LR: "3e-05", "seed": "2"},
    ]  # fmt: skip
    for job in jobs:  # not re-escaped: an interpolation stays one, a quoted comma is no sweep
        assert [o for o in job.overrides if not o.startswith((LR, "seed"))] == [typed[0], *typed[3:]]
    assert expand(["seed=choice(7,8)", "+experiment=smoke,tiny"])[1].overrides == [
        "seed=7",
        "+experiment=tiny",
    ]
    assert [j.overrides for j in expand(["seed=1"])] == [["seed=1"]]  # no sweep: the one run as typed


def test_a_sweep_hydra_cannot_list_is_a_config_error():
    with pytest.raises(ConfigError, match=r"glob\(\) sweeps are not supported"):
        expand(["+experiment=glob(*)"])
    with pytest.raises(ConfigError, match="cannot expand the sweep"):
        expand([f"{LR}=interval(0,1)"])


def test_a_bad_combination_stops_the_sweep_before_any_run_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The second value is no number: named with its run before a server or a cluster starts.
    code = main(["run", "--multirun", "+experiment=smoke", f"output_dir={tmp_path}/out", f"{LR}=1e-3,fast"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"sweep run 2 of 2 ({LR}=fast)" in err and "learning_rate" in err, err
    assert not (tmp_path / "out").exists()


def test_resume_is_refused_for_a_sweep_of_several_runs_but_not_for_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "-m", "+experiment=smoke", f"output_dir={tmp_path}/out", "seed=1,2",
                 "resume_from_checkpoint=auto"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "resume_from_checkpoint cannot be set for a sweep of several runs" in err, err
    alone = ["+experiment=smoke", f"output_dir={tmp_path}/out", "seed=1", "resume_from_checkpoint=auto"]
    assert [j.overrides for j in plan(alone, "sft_config", None)] == [alone]


def test_the_summary_names_each_runs_values_result_and_what_did_not_run(capsys):
    jobs = expand([f"{LR}=1e-3,1e-2,1e-1"])
    jobs[0].exit_code = 0
    jobs[0].result = {"registered_model": "m", "model_version": "3", "run_folder": "/o/runs/a",
                      "last_metric": [6, 1.23456]}  # fmt: skip
    jobs[1].exit_code = 130  # stopped by Ctrl-C: the sweep ends there
    print_sweep_summary(jobs)
    out = capsys.readouterr().out
    assert "==== sweep: 2 of 3 run(s) ran, 1 failed" in out
    rows = out.splitlines()[-4:]
    assert rows[0].split() == ["#", "exit", LR, "val_loss", "registered", "version", "run", "folder"]
    assert rows[1].split() == ["1", "0", "0.001", "1.2346", "(step", "6)", "models:/m/3", "/o/runs/a"]
    assert rows[2].split() == ["2", "130", "(SIGINT)", "0.01", "-", "-", "-"]
    assert rows[3].split() == ["3", "not", "run", "0.1", "-", "-", "-"]


def test_a_secret_on_a_sweeps_command_line_reaches_its_runs_only_through_the_environment(monkeypatch):
    import os

    from flows import sweep

    started: list[list[str]] = []

    def fake_run(overrides, config_name, config_path):  # stands in for the `sft run` process only
        started.append(overrides)
        return 0, {}, None

    monkeypatch.setattr(sweep, "_run_one", fake_run)
    monkeypatch.setenv("HF_TOKEN", "")  # restored (removed) after the test, whatever the sweep set
    monkeypatch.delenv("HF_TOKEN")
    code = sweep.run_sweep(
        ["+experiment=smoke", "seed=1,2", "+system_envs.HF_TOKEN=hf_secret123"], "sft_config", None
    )
    assert code == 0 and len(started) == 2
    assert all("+system_envs.HF_TOKEN=${oc.env:HF_TOKEN}" in job for job in started), started
    assert os.environ["HF_TOKEN"] == "hf_secret123"  # inherited by each run's process
