"""MFU: the FLOP count of a training step (6N plus attention, per packed sample), the datasheet
peaks of GPUs, the CPU peak measured once per machine, and a utilization that never exceeds 1."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from sft_core.train import mfu
from sft_core.train.metrics import train_metrics
from sft_core.train.stats import RankStep, StepStats


def test_flops_are_6n_plus_attention_over_each_packed_samples_own_length():
    shape = mfu.ModelShape(params=10_000, layers=3, attn_width=32, embedding_params=0)
    # One row holding samples of 100 and 28 tokens attends within each: 100^2 + 28^2, not 128^2.
    squares = mfu.row_square_lengths(np.array([0, 100, 128, 200]), [[0, 1], [2]])
    assert squares.tolist() == [100**2 + 28**2, 72**2]
    flops = mfu.training_flops(shape, real_tokens=128, attn_square_tokens=int(squares[0]))
    assert flops == 6 * 10_000 * 128 + 12 * 3 * 32 * (100**2 + 28**2)


def test_untied_input_embedding_is_a_lookup_and_lora_trains_no_base_weight():
    untied = mfu.ModelShape(params=10_000, layers=1, attn_width=8, embedding_params=4_000)
    assert mfu.training_flops(untied, 10, 0) == 6 * 6_000 * 10
    lora = mfu.ModelShape(params=10_000, layers=1, attn_width=8, embedding_params=0, trained_fraction=0.0)
    assert mfu.training_flops(lora, 10, 0) == 4 * 10_000 * 10  # forward + activation gradients


def test_flop_formula_matches_torch_flop_counter_on_the_real_tiny_model(tiny_model_dir):
    """torch counts every matmul of a real forward + backward (eager attention, so QK^T and AV are
    matmuls too); the formula must agree up to the norm weights it counts as matmul weights."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from sft_core.model.load import count_parameters, load_causal_lm

    model = load_causal_lm(tiny_model_dir, torch.float32, "eager")
    model.config.use_cache = False
    shape = mfu.ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_model_dir), count_parameters(model))
    tokens = 96
    ids = torch.randint(0, 1000, (1, tokens))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, position_ids=torch.arange(tokens)[None]).logits.sum().backward()
    expected = mfu.training_flops(shape, tokens, tokens**2)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-3)
    # The LM head at 30 target positions only (as TorchStrategy runs it): counted for those only.
    keep = torch.zeros(1, tokens, dtype=torch.bool)
    keep[0, 50:80] = True
    with FlopCounterMode(display=False) as counter:
        model(
            input_ids=ids, position_ids=torch.arange(tokens)[None], logits_to_keep=keep
        ).logits.sum().backward()
    selected = mfu.training_flops(shape, tokens, tokens**2, head_tokens=30)
    assert counter.get_total_flops() == pytest.approx(selected, rel=1e-3)
    assert selected < 0.5 * expected  # the tiny model's 49k-word head is most of its FLOPs


def test_mfu_is_never_above_one():
    assert mfu.mfu(flops=5e12, seconds=1.0, peak_flops=1e13) == 0.5
    assert mfu.mfu(flops=5e13, seconds=1.0, peak_flops=1e13) == 1.0  # an underestimated peak
    assert mfu.mfu(flops=1.0, seconds=0.0, peak_flops=1e13) == 0.0


def test_step_mfu_is_all_flops_over_all_workers_peaks():
    def rank(r: int, flops: float, seconds: float) -> RankStep:
        stats = StepStats(loss_sum=1.0, targets=10, grad_norm=1.0, lr=1e-4, skipped_steps=0,
                          time_fwd_bwd=0.0, time_optimizer=0.0)  # fmt: skip
        return RankStep(rank=r, stats=stats, num_targets=10, tokens=64, real_tokens=60 if flops else 0,
                        flops=flops, peak_flops=1e11, time_data=0.0, time_step=seconds, epoch=0,
                        peak_memory_mb=1.0)  # fmt: skip

    # A tensor-parallel peer reports no tokens but its device was busy: its peak still counts.
    metrics = train_metrics([rank(0, 6e10, 1.0), rank(1, 0.0, 0.5)])
    assert metrics["sft_train/mfu"] == pytest.approx(6e10 / 1.0 / 2e11)


@pytest.mark.parametrize(
    ("device_name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5),
        ("NVIDIA H100 NVL", torch.bfloat16, 835.5),
        ("NVIDIA H200", torch.bfloat16, 989.4),
        ("NVIDIA GH200 480GB", torch.bfloat16, 989.4),
        ("NVIDIA H20", torch.bfloat16, 148.0),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5),
        ("NVIDIA A10G", torch.bfloat16, 125.0),
        ("NVIDIA L40S", torch.bfloat16, 362.1),
        ("NVIDIA L4", torch.bfloat16, 121.0),
        ("NVIDIA GeForce RTX 4090", torch.float16, 165.2),
        ("NVIDIA H200", torch.float32, 66.9),
    ],
)
def test_gpu_peak_is_the_datasheet_dense_figure_of_the_named_device(device_name, dtype, tflops):
    assert mfu.gpu_peak_flops(device_name, dtype) == pytest.approx(tflops * 1e12)


def test_unknown_gpu_has_no_datasheet_peak():
    assert mfu.gpu_peak_flops("Some Future Accelerator", torch.bfloat16) is None


def test_configured_peak_wins_over_everything(tmp_path):
    peak, source = mfu.peak_flops(torch.device("cpu"), torch.float32, tmp_path, peak_tflops=2.5)
    assert (peak, source) == (2.5e12, "config peak_tflops")
    assert not (tmp_path / "peak_flops.json").exists()  # nothing measured


def test_cpu_peak_is_measured_once_per_machine_and_cached(tmp_path):
    first = mfu.cpu_peak_flops(tmp_path, torch.float32, threads=1, size=512)
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    (key,) = cache
    assert "threads=1" in key and "float32" in key
    assert cache[key]["flops"] == first > 1e9  # any CPU that trains reaches 1 GFLOP/s
    assert mfu.cpu_peak_flops(tmp_path, torch.float32, threads=1, size=512) == first  # read back
    # Another thread count is another figure.
    mfu.cpu_peak_flops(tmp_path, torch.float32, threads=2, size=512)
    assert len(json.loads((tmp_path / "peak_flops.json").read_text())) == 2


def test_workers_starting_together_measure_the_cpu_peak_once(tmp_path, monkeypatch):
    measured = []
    real = mfu.measure_matmul_flops

    def counted(*args):
        measured.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(mfu, "measure_matmul_flops", counted)
    results: list[float] = []
    workers = [
        threading.Thread(target=lambda: results.append(mfu.cpu_peak_flops(tmp_path, torch.float32, 1, 512)))
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(measured) == 1  # the others waited at the lock and read the cache
    assert len(set(results)) == 1 and len(results) == 3
