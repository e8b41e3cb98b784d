"""The demo data generator reproduces the shipped files, and the rows have the shape the pipeline expects."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
SPLITS = {"train": 320, "validation": 40}
FIELDS = {"instruction", "input", "output"}


def read_jsonl(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    script = DEMO / "build_demo_data.py"
    subprocess.run(
        [sys.executable, str(script), "--out", str(out)], check=True, capture_output=True, timeout=60
    )
    return out


@pytest.mark.parametrize("split", SPLITS)
def test_generator_reproduces_shipped_files(generated: Path, split: str) -> None:
    # Byte for byte: caches, tests and benchmarks keyed on these files must stay comparable.
    assert (generated / f"{split}.jsonl").read_bytes() == (DEMO / f"{split}.jsonl").read_bytes()


@pytest.mark.parametrize("split", SPLITS)
def test_row_schema(split: str) -> None:
    rows = read_jsonl(DEMO / f"{split}.jsonl")
    assert len(rows) == SPLITS[split]
    for row in rows:
        assert FIELDS <= set(row) <= FIELDS | {"system"}, row
        assert all(isinstance(row[k], str) for k in row), row
        assert row["instruction"].strip() and row["output"].strip(), row
        if "system" in row:
            assert row["system"].strip(), row


def test_no_pair_shared_between_splits() -> None:
    def keys(split: str) -> set[tuple[object, object]]:
        return {(r["instruction"], r["input"]) for r in read_jsonl(DEMO / f"{split}.jsonl")}

    assert len(keys("train")) == SPLITS["train"]  # no duplicates within train either
    assert not keys("train") & keys("validation")


def test_hand_written_seed_rows() -> None:
    rows = read_jsonl(DEMO / "seed" / "hand_written.jsonl")
    assert rows
    for row in rows:
        assert {"category"} | FIELDS <= set(row) <= {"category", "system"} | FIELDS, row
        assert all(isinstance(v, str) for v in row.values()), row
