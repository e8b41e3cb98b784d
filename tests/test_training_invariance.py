"""The loss is normalized per supervised token of the whole step: splitting the step over workers
or micro-batches does not change the weights (real Ray actors, gloo, fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch

from sft_core.config_loader import load_config
from tests.helpers import encoded_demo, train_on_cluster

pytestmark = pytest.mark.slow
STEPS = 5


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir, smollm2_tokenizer) -> dict:
    # No packing: rows differ in length and supervised tokens, which is what exposes a wrong normalization.
    return encoded_demo(tmp_path_factory.mktemp("data"), smollm2_tokenizer, tiny_model_dir, packing=False)


def train_weights(
    artifacts: dict, workers: int, micro: int, accumulation: int, strategy: str = "ddp_train", *extra: str
) -> tuple[dict[str, torch.Tensor], list[float]]:
    cfg = load_config(
        "sft_config",
        [
            "+experiment=smoke",
            f"sft_train.device_mapping={list(range(workers))}",
            f"sft_train.training_args.per_device_train_batch_size={micro}",
            f"sft_train.training_args.gradient_accumulation_steps={accumulation}",
            f"sft_train.training_args.max_steps={STEPS}",
            "sft_train.training_args.learning_rate=1e-4",
            "sft_train.training_args.max_grad_norm=0",
            f"sft_train.strategy_args.strategy_name={strategy}",
            *extra,
        ],
        base_dir=Path.cwd(),
    )
    weights, losses, _ = train_on_cluster(cfg, artifacts, STEPS)
    return weights, losses


def test_workers_and_accumulation_do_not_change_the_weights(artifacts):
    ray.init(
        "local", num_cpus=2, include_dashboard=False, logging_level="warning"
    )  # never a `ray start` cluster
    try:
        reference, ref_losses = train_weights(artifacts, workers=1, micro=8, accumulation=1)
        layouts = {
            "ddp 1x2x4": train_weights(artifacts, 1, 2, 4),
            "ddp 2x2x2": train_weights(artifacts, 2, 2, 2),
            "fsdp2 2x2x2": train_weights(artifacts, 2, 2, 2, "fsdp2_train"),
            # glibc's own allocator settings: where freed memory goes changes nothing computed
            "ddp 2x2x2, keep_host_memory=false": train_weights(
                artifacts, 2, 2, 2, "ddp_train", "sft_train.keep_host_memory=false"
            ),
        }
    finally:
        ray.shutdown()
    from safetensors.torch import load_file

    initial = load_file(str(Path(artifacts.model_dir) / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert (reference[key] - initial[key]).abs().max() > 5e-5, "training did not move the weights"
    # Adam divides by sqrt(v): float noise in near-zero gradients (different padding, summation
    # order) becomes update noise of order lr, hence a modest lr; the losses are compared tightly.
    for name, (weights, losses) in layouts.items():
        assert losses == pytest.approx(ref_losses, rel=1e-6), name
        for key, ref in reference.items():
            diff = (weights[key] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert diff < 1e-5, f"{name}: {key} differs by {diff:.2e} (relative)"


LORA = "+sft_train.model_args.lora={rank: 4, alpha: 8, target_modules: all-linear}"


def test_workers_and_accumulation_do_not_change_the_lora_adapter(artifacts):
    ray.init(
        "local", num_cpus=2, include_dashboard=False, logging_level="warning"
    )  # never a `ray start` cluster
    try:
        reference, ref_losses = train_weights(artifacts, 1, 8, 1, "ddp_train", LORA)
        layouts = {
            "ddp 2x2x2": train_weights(artifacts, 2, 2, 2, "ddp_train", LORA),
            "fsdp2 2x2x2": train_weights(artifacts, 2, 2, 2, "fsdp2_train", LORA),
        }
    finally:
        ray.shutdown()
    adapter = [k for k in reference if "lora_" in k]
    assert adapter and all("lora_" in k or "base_layer" in k or "lora_" not in k for k in reference)
    assert max(reference[k].abs().max().item() for k in adapter if "lora_B" in k) > 0, "adapter did not train"
    for name, (weights, losses) in layouts.items():
        assert losses == pytest.approx(ref_losses, rel=1e-6), name
        for key, ref in reference.items():
            diff = (weights[key] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert diff < 1e-5, f"{name}: {key} differs by {diff:.2e} (relative)"
