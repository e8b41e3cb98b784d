"""The shape of the code itself: what each room may import, and one home for each decision."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from sft_core.strategies.base import Strategy
from sft_core.strategies.config_schema import StrategyConfig
from sft_core.strategies.registry import ARGS, SUPPORTED_STRATEGIES, known_strategy_name, strategy_for
from tests.helpers import REPO

SFT_CORE = REPO / "sft_core"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (at any depth of the file: function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _room_imports(room: str) -> dict[str, set[str]]:
    return {str(f.relative_to(REPO)): _imports(f) for f in (SFT_CORE / room).rglob("*.py")}


def test_sft_core_never_imports_prefect_flows_or_tasks():
    for f in SFT_CORE.rglob("*.py"):
        bad = {m for m in _imports(f) if m.split(".")[0] in ("prefect", "flows", "tasks")}
        assert not bad, f"{f.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize(
    ("room", "above"),
    [
        ("train", ("sft_core.cluster", "sft_core.strategies", "ray")),
        ("data", ("sft_core.cluster", "sft_core.strategies", "sft_core.train", "ray")),
        ("strategies", ("sft_core.cluster", "ray")),
    ],
)
def test_imports_point_down(room, above):
    """cluster -> strategies -> train -> data / model: no room imports one above it."""
    for file, modules in _room_imports(room).items():
        up = {m for m in modules if m.startswith(above)}
        assert not up, f"{file} imports {up} (above sft_core/{room})"


def test_every_strategy_name_has_its_schema_and_its_class():
    assert SUPPORTED_STRATEGIES == ("ddp_train", "fsdp2_train", "megatron_train")
    for args in ARGS:
        cfg = _config(args.name())
        cls = strategy_for(cfg)
        assert issubclass(cls, Strategy) and cls.name == args.name()
        assert isinstance(cfg.sft_train.strategy_args.strategy_config, StrategyConfig)
        assert cls.describe(cfg).startswith(args.name())


def test_a_misspelled_strategy_name_is_answered_with_the_closest():
    with pytest.raises(ValueError, match=r"unknown strategy 'fsdp_train' \(did you mean 'fsdp2_train'\?\)"):
        known_strategy_name("fsdp_train")


def test_no_strategy_name_is_tested_outside_the_strategy_package():
    """Decisions about one strategy live in its class (strategies/); nothing above compares names."""
    test = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](ddp|fsdp2|megatron)_train["']""")
    for root in ("sft_core", "flows", "tasks"):
        for f in (REPO / root).rglob("*.py"):
            if "strategies" in f.parts:
                continue
            hits = [n for n, line in enumerate(f.read_text().splitlines(), 1) if test.search(line)]
            assert not hits, f"{f.relative_to(REPO)} lines {hits} test a strategy name"


def _config(strategy: str):
    from sft_core.config_loader import load_config

    return load_config("sft_config", [f"sft_train.strategy_args.strategy_name={strategy}"])
