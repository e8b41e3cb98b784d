"""`model_args.compile`: the decoder layers under torch.compile train the same model as eager ones.

Inductor reorders and fuses floating-point work, so the comparison has a tolerance, stated here and
measured on the tiny model in fp32 (CPU): the largest relative loss difference over the steps and
the largest weight difference after them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sft_core.config_loader import load_config
from sft_core.errors import ConfigError
from sft_core.home import inductor_cache
from sft_core.preflight import check_compiler
from sft_core.strategies.base import DistContext
from sft_core.strategies.registry import create_strategy
from tests.helpers import encoded_demo

CPU = torch.device("cpu")
STEPS = 4
# Measured (lr 1e-3, 4 steps, with and without gradient checkpointing; the loss compiled too):
# losses within 2e-7 relative, weights up to 1.5e-6 apart (Adam's update turns a last-bit gradient
# difference into up to ~lr); the bounds leave room for other CPUs' vector widths.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def smoke_cfg(*extra: str):
    return load_config(
        "sft_config",
        ["+experiment=smoke", "sft_train.model_args.dtype=fp32", "sft_train.device_mapping=[0]", *extra],
        base_dir=Path.cwd(),
    )


def _train(artifacts, *extra: str) -> tuple[list[float], float, dict[str, torch.Tensor], object]:
    """STEPS steps on the demo rows, then one validation pass: losses, validation loss, weights."""
    from sft_core.data.collate import collate_rows
    from sft_core.data.packing import PackedPlan
    from sft_core.data.store import EncodedData
    from sft_core.model.resolve import load_tokenizer

    data = EncodedData.load(artifacts.train.encoded)
    plan = PackedPlan.from_dict(json.loads(Path(artifacts.train.plan).read_text()))
    pad = int(load_tokenizer(artifacts.tokenizer_dir).pad_token_id)
    torch.manual_seed(0)
    strategy = create_strategy(
        smoke_cfg("sft_train.training_args.learning_rate=1e-3", *extra), DistContext(0, 1, CPU)
    )
    strategy.initialize(Path(artifacts.model_dir), STEPS)
    losses = []
    for step in range(STEPS):
        batch = collate_rows(data, plan, [step, step + STEPS], pad)  # 2 rows: a [2, T] micro-batch
        out = strategy.train_step([batch], int((batch.labels[:, 1:] != -100).sum()))
        losses.append(out.loss_sum / out.targets)
    sums = strategy.eval_step([collate_rows(data, plan, [2 * STEPS], pad)])
    return losses, sums.loss_sum / sums.targets, strategy.full_state_dict(), strategy


@pytest.mark.slow
def test_compiled_layers_train_what_eager_ones_do(tmp_path, tiny_model_dir, smollm2_tokenizer):
    """(With activation checkpointing as well, measured alike; tests/test_resume.py runs that one.)"""
    artifacts = encoded_demo(tmp_path, smollm2_tokenizer, tiny_model_dir, packing=True)
    eager_losses, eager_val, eager_weights, _ = _train(artifacts)
    losses, val, weights, strategy = _train(artifacts, "sft_train.model_args.compile=true")

    layers = strategy.module.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers), "layers were not compiled"
    # Kernels were cached in the project's home, not in /tmp where another user could plant them.
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(inductor_cache())
    assert any(inductor_cache().rglob("*.py")), "nothing compiled into the cache"
    assert eager_losses[-1] < eager_losses[0], "training did not lower the loss"
    for step, (a, b) in enumerate(zip(losses, eager_losses, strict=True)):
        assert abs(a - b) / b < LOSS_RTOL, f"step {step}: compiled {a:.7f} vs eager {b:.7f}"
    assert abs(val - eager_val) / eager_val < LOSS_RTOL
    # The state dict a checkpoint is saved from has the model's own names (no `_orig_mod.`).
    assert weights.keys() == eager_weights.keys()
    worst = max(float((weights[k] - eager_weights[k]).abs().max()) for k in weights)
    assert worst < WEIGHT_ATOL, f"weights differ by up to {worst:.2e}"
    # And the weights moved: a compiled layer whose gradients were lost would leave them in place.
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    moved = [k for k in initial if k.startswith("model.layers.") and not torch.equal(initial[k], weights[k])]
    assert len(moved) == sum(k.startswith("model.layers.") for k in initial)


def test_compile_is_refused_with_megatron_by_its_key():
    with pytest.raises(
        ConfigError, match=r"config key 'sft_train\.model_args\.compile': not supported with megatron_train"
    ):
        load_config(
            "sft_config",
            [
                "+experiment=smoke",
                "sft_train.model_args.compile=true",
                "sft_train.strategy_args.strategy_name=megatron_train",
            ],
            base_dir=Path.cwd(),
        )


def test_compile_without_a_compiler_on_the_machine_is_refused_before_workers_start(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, gcc, cc, clang++
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(
        ConfigError, match=r"'sft_train\.model_args\.compile': torch\.compile needs a C/C\+\+ compiler"
    ):
        check_compiler()
    (tmp_path / "g++").write_text("#!/bin/sh\n")
    (tmp_path / "g++").chmod(0o755)
    check_compiler()  # one compiler on PATH is enough
