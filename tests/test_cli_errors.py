"""User mistakes end in one paragraph naming the key, file, row or field, and a non-zero exit."""

from __future__ import annotations

import pytest

from tests.helpers import ray_head, run_cli


def assert_user_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-2000:])


def test_misspelled_config_key(tmp_path):
    assert_user_error(
        run_cli(["run", "+sft_train.training_args.learnin_rate=1"], tmp_path),
        "sft_train.training_args.learnin_rate",
        "did you mean 'learning_rate'",
    )


def test_missing_data_file(tmp_path):
    assert_user_error(
        run_cli(["run", "sft_train.data_args.file_name=nope.jsonl"], tmp_path),
        f"{tmp_path}/nope.jsonl",
        "does not exist",
        "sft_train.data_args.file_name",
    )


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("output_dir", "notes.txt", "'{d}/notes.txt' is a file, not a folder"),
        ("logging_dir", "notes.txt/tb", "'{d}/notes.txt/tb' cannot be made: {d}/notes.txt is a file"),
        (
            "+tracker_kwargs.log_dir",
            "notes.txt/tb",
            "'{d}/notes.txt/tb' cannot be made: {d}/notes.txt is a file",
        ),
    ],
)
def test_an_output_folder_that_is_a_file_is_named_before_anything_starts(tmp_path, key, value, says):
    (tmp_path / "notes.txt").write_text("keep me")
    result = run_cli(["run", f"{key}={value}"], tmp_path)
    assert_user_error(result, f"config key '{key.removeprefix('+')}'", says.format(d=tmp_path))
    text = result.stdout + result.stderr
    assert "Beginning flow run" not in text and "Ray:" not in text and "started in" not in text, text[-2000:]
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_pretrain_path_that_does_not_exist(tmp_path):
    assert_user_error(run_cli(["run", "pretrain=./no/such/model"], tmp_path), "pretrain", "does not exist")


def test_device_mapping_larger_than_the_machine(tmp_path):
    assert_user_error(
        run_cli(
            [
                "run",
                "sft_train.device_mapping=[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63,64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79,80,81,82,83,84,85,86,87,88,89,90,91,92,93,94,95,96,97,98,99,100,101,102,103,104,105,106,107,108,109,110,111,112,113,114,115,116,117,118,119,120,121,122,123,124,125,126,127,128]",
            ],
            tmp_path,
        ),
        "sft_train.device_mapping",
        "this machine has",
    )


REFUSED = """
import json, sys
import ray
from flows import cli, ray_start
from sft_core.errors import ConfigError

try:
    cli.run("sft_config", sys.argv[1:], None)
except ConfigError as err:
    print(json.dumps({"error": str(err), "ray_started": ray_start.take_early_start() is not None or ray.is_initialized()}))
"""


def test_a_config_the_machine_cannot_run_starts_no_ray_with_a_server_up(prefect_server, tmp_path):
    """With the Prefect server already up, `sft run` used to begin Ray's start before its checks: a
    check that failed while Ray was still starting left Ray's agents running after the command."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    too_many = f"sft_train.device_mapping=[{','.join(map(str, range(129)))}]"
    args = ["+experiment=smoke", too_many, f"output_dir={tmp_path}/out"]
    out = subprocess.run([sys.executable, "-c", REFUSED, *args], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "sft_train.device_mapping" in seen["error"] and seen["ray_started"] is False, seen


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
            ["train.jsonl, row 2", "field 'output'"],
        ),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "out\n',
            ["train.jsonl, line 2", "not valid JSON"],
        ),
    ],
    ids=["row-without-response", "unreadable-json-line"],
)
def test_bad_rows_name_file_row_and_field(prefect_server, tmp_path, content, needles):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    result = run_cli(
        ["run", "+experiment=smoke", f"sft_train.data_args.file_name={data}", f"output_dir={tmp_path}/out"],
        tmp_path,
    )
    assert_user_error(result, *needles)


@pytest.mark.slow
def test_a_ray_address_that_wants_a_token_says_how_to_give_it(prefect_server, tmp_path):
    """A cluster with token authentication (Ray's default where a token exists), and Ray sends no
    token to an explicit address by itself: the run stops naming ray_address and what to set, not
    with Ray's GCS connection traceback."""
    import os
    import secrets

    # `ray start --head` turns token authentication on where ~/.ray/auth_token exists (a default
    # `ray.init()` writes one): this test's own HOME with its own token.
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(home)}
    log = tmp_path / "ray-head.log"
    with ray_head(log, env, num_cpus=1) as port:
        assert "Token authentication is enabled" in log.read_text(), log.read_text()[-2000:]
        result = run_cli(
            ["run", "+experiment=smoke", f"ray_address=127.0.0.1:{port}", f"output_dir={tmp_path}/out"],
            tmp_path,
            env={"HOME": str(home), "RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None},  # a user's shell
        )
    assert_user_error(result, "ray_address", "requires token authentication", "RAY_AUTH_MODE=token")
