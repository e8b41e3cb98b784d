"""Pieces of the training step, checked on their own (one process, the tiny model)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from sft_core.config_loader import load_config
from sft_core.data.collate import MicroBatch, masked_batch
from sft_core.strategies.base import DistContext
from sft_core.strategies.registry import create_strategy
from sft_core.train.batching import BatchSchedule, split_for_rank
from sft_core.train.loss import next_token_targets, summed_token_loss
from sft_core.train.schedule import build_scheduler, follow_schedule, lr_factor


def test_warmup_then_cosine_decays_to_the_minimum_lr():
    factors = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert lr_factor(5, 10, 2, "constant_with_warmup", 0.0) == 1.0
    assert lr_factor(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)


def test_a_resumed_schedule_gives_the_lr_of_the_runs_own_length():
    def scheduler(total: int) -> torch.optim.lr_scheduler.LambdaLR:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return build_scheduler(opt, total, 2, 0.0, "cosine", 0.0)

    saved = scheduler(8)
    for _ in range(8):
        saved.optimizer.step()
        saved.step()
    assert saved.optimizer.param_groups[0]["lr"] == 0.0  # the end of an 8-step cosine
    same, longer = scheduler(8), scheduler(10)
    for resumed in (same, longer):
        resumed.optimizer.load_state_dict(saved.optimizer.state_dict())
        resumed.load_state_dict(saved.state_dict())
        follow_schedule(resumed)
    assert same.optimizer.param_groups[0]["lr"] == 0.0  # unchanged: bit for bit the saved value
    expected = 1e-3 * lr_factor(8, 10, 2, "cosine", 0.0)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12) and expected > 1e-5
    assert longer.get_last_lr() == [longer.optimizer.param_groups[0]["lr"]]


def test_token_loss_scores_each_position_against_the_next_supervised_label():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[-100, 3, 4, -100, 6], [-100, -100, 1, 2, -100]])
    loss, n = summed_token_loss(logits, next_token_targets(labels))
    # Reference: one position at a time, -log softmax(logits[b, t])[labels[b, t + 1]].
    pairs = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != -100]
    expected = sum(-torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for b, t in pairs)
    assert n == len(pairs) == 5
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.count_nonzero(logits.grad[:, -1]) == 0  # the last position predicts nothing
    assert torch.count_nonzero(logits.grad[0, 0]) == 7 and torch.count_nonzero(logits.grad[1, 0]) == 0


def test_each_epoch_is_a_seeded_permutation_of_every_row():
    schedule = BatchSchedule(num_rows=10, global_batch_size=4, seed=3)
    assert schedule.steps_per_epoch == 3
    for epoch in range(2):
        rows = [r for s in range(epoch * 3, epoch * 3 + 3) for r in schedule.global_batch(s)]
        assert sorted(rows) == list(range(10))  # the short last batch keeps the remainder
    assert schedule.global_batch(0) != schedule.global_batch(3) or schedule.global_batch(
        1
    ) != schedule.global_batch(4)
    assert schedule.global_batch(0) == BatchSchedule(10, 4, 3).global_batch(0)
    assert schedule.global_batch(0) != BatchSchedule(10, 4, 4).global_batch(0)


@pytest.mark.parametrize(("world", "micro"), [(1, 8), (2, 2), (3, 1)])
def test_ranks_and_micro_batches_partition_the_global_batch(world, micro):
    rows = list(range(7))
    parts = [mb for r in range(world) for mb in split_for_rank(rows, r, world, micro)]
    assert sorted(i for mb in parts for i in mb) == rows
    assert all(len(mb) <= micro for mb in parts)


def _strategy(tiny_model_dir: Path, *overrides: str):
    cfg = load_config("sft_config", ["+experiment=smoke", "sft_train.device_mapping=[0]", *overrides])
    strategy = create_strategy(cfg, DistContext(0, 1, torch.device("cpu")))
    strategy.initialize(tiny_model_dir, total_steps=10)
    return strategy


def _batch(seed: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100
    return MicroBatch(ids, labels, torch.arange(24).repeat(2, 1), ids.numel())


def test_a_non_finite_gradient_skips_the_step_and_is_counted(tiny_model_dir):
    strategy = _strategy(tiny_model_dir)
    before = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    hooks = [p.register_hook(lambda g: g * math.nan) for p in strategy.module.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = strategy.train_step([_batch()], num_targets=32)
    assert out.skipped_steps == 1 and not math.isfinite(out.grad_norm)
    # The schedule still advances (lr follows the global step); torch's warning about that order is
    # expected here and silenced for this call only.
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert all(torch.equal(v, before[k]) for k, v in strategy.module.state_dict().items())
    for h in hooks:
        h.remove()
    out = strategy.train_step([_batch()], num_targets=32)
    assert out.skipped_steps == 1 and math.isfinite(out.grad_norm)
    assert not torch.equal(strategy.module.state_dict()["model.norm.weight"], before["model.norm.weight"])


def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir):
    plain = _strategy(tiny_model_dir)
    checkpointed = _strategy(tiny_model_dir, "++sft_train.training_args.gradient_checkpointing=true")
    a = plain.train_step([_batch(1), _batch(2)], num_targets=64)
    b = checkpointed.train_step([_batch(1), _batch(2)], num_targets=64)
    assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-6)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for (k, v), w in zip(
        plain.module.state_dict().items(), checkpointed.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-7, msg=k)


def test_the_lm_head_only_at_target_positions_gives_the_same_step(tiny_model_dir):
    selected = _strategy(tiny_model_dir)
    full = _strategy(tiny_model_dir)
    full.logits_at_targets_only = False
    assert selected.logits_at_targets_only  # transformers' boolean logits_to_keep was detected
    uneven = _batch(3)
    uneven.labels[1, :20] = -100  # rows with different numbers of targets
    batches = [_batch(1), uneven, masked_batch()]
    for _ in range(2):  # the second step runs on the weights the first one changed
        a = selected.train_step(batches, num_targets=52)
        b = full.train_step(batches, num_targets=52)
        assert a.targets == b.targets == 52
        assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-6)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for (k, v), w in zip(
        selected.module.state_dict().items(), full.module.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-7, msg=k)
    ev_a, ev_b = selected.eval_step(batches), full.eval_step(batches)
    assert ev_a.targets == ev_b.targets == 52 and ev_a.loss_sum == pytest.approx(ev_b.loss_sum, rel=1e-6)


def test_masked_filler_batches_change_nothing(tiny_model_dir):
    a, b = _strategy(tiny_model_dir), _strategy(tiny_model_dir)
    ra = a.train_step([_batch()], num_targets=32)
    rb = b.train_step([_batch(), masked_batch()], num_targets=32)
    assert ra.loss_sum == pytest.approx(rb.loss_sum) and ra.grad_norm == pytest.approx(rb.grad_norm)


def test_packing_on_or_off_gives_the_same_loss_on_the_same_samples(tiny_model_dir, smollm2_tokenizer):
    from sft_core.data.collate import collate_rows
    from sft_core.data.encode import encode_files
    from sft_core.data.messages import FieldMapping
    from sft_core.data.packing import plan_rows
    from sft_core.data.spec import EncodeSpec
    from tests.helpers import DEMO

    tok = smollm2_tokenizer
    spec = EncodeSpec(256, fields=FieldMapping(query_key="input"))
    data, _ = encode_files([str(DEMO / "validation.jsonl")], tok, spec, limit=24)
    strategy = _strategy(tiny_model_dir)
    results = {}
    for packing in (True, False):
        plan = plan_rows(data, 256, packing)
        batches = [collate_rows(data, plan, list(range(i, min(i + 4, len(plan.rows)))), tok.pad_token_id)
                   for i in range(0, len(plan.rows), 4)]  # fmt: skip
        sums = strategy.eval_step(batches)
        results[packing] = (len(plan.rows), sums.loss_sum, sums.targets)
    assert results[True][0] < results[False][0]  # packing did pack
    assert results[True][2] == results[False][2]  # the same supervised targets
    assert results[True][1] == pytest.approx(results[False][1], rel=1e-5)


def _save_checkpoint(strategy, root: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A checkpoint as the worker writes it: the Hugging Face folder, then the resume state."""
    from sft_core.model.resolve import load_tokenizer

    strategy.save_hf(root / "sft_train", load_tokenizer(tiny_model_dir))
    strategy.save_state(root / "train_state")
    return root / "train_state", root / "sft_train"


def test_resume_state_loads_with_weights_only_and_continues_exactly(tiny_model_dir, tmp_path):
    import random

    import numpy as np

    a = _strategy(tiny_model_dir)
    a.train_step([_batch(1)], num_targets=32)
    state, hf = _save_checkpoint(a, tmp_path, tiny_model_dir)
    for f in state.glob("rank*.pt"):  # no pickled objects: nothing in it can run code on load
        torch.load(f, weights_only=True)
    # The weights are written once, in the Hugging Face folder: the resume state holds Adam's two
    # moments (2x the weights) and no third copy.
    weights = sum(v.numel() * v.element_size() for v in a.module.parameters())
    saved = sum(f.stat().st_size for f in (state / "dcp").iterdir())
    assert 1.9 * weights < saved < 2.2 * weights, (saved, weights)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    expected = a.train_step([_batch(2)], num_targets=32)

    b = _strategy(tiny_model_dir)
    b.load_state(state, hf)
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]
    got = b.train_step([_batch(2)], num_targets=32)
    assert got.loss_sum == expected.loss_sum and got.grad_norm == expected.grad_norm
    for (k, v), w in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        assert torch.equal(v, w), k

    missing = tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="keeps its weights in this Hugging Face folder"):
        _strategy(tiny_model_dir).load_state(state, missing)


def test_resume_state_with_the_weights_inside_still_loads_exactly(tiny_model_dir, tmp_path):
    """Checkpoints written before the weights left the resume state (DCP holds "model" too, the
    rank file names no `weights`) resume as before, without reading the Hugging Face folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    a = _strategy(tiny_model_dir)
    a.train_step([_batch(1)], num_targets=32)
    model_sd, optim_sd = get_state_dict(a.model, a.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "dcp"))
    a.save_rank_state(tmp_path / "rank0.pt", scheduler=a.scheduler.state_dict())
    expected = a.train_step([_batch(2)], num_targets=32)

    b = _strategy(tiny_model_dir)
    b.load_state(tmp_path, tmp_path / "no-hf-folder")
    got = b.train_step([_batch(2)], num_targets=32)
    assert got.loss_sum == expected.loss_sum and got.grad_norm == expected.grad_norm
    for (k, v), w in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


LORA = "+sft_train.model_args.lora={rank: 4, alpha: 8, target_modules: all-linear}"


def test_lora_trains_only_the_adapter_and_its_exports_load_as_the_trained_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sft_core.model.resolve import load_tokenizer

    strategy = _strategy(tiny_model_dir, LORA)
    before = {k: v.clone() for k, v in strategy.module.state_dict().items()}
    for seed in range(3):
        strategy.train_step([_batch(seed)], num_targets=32)
    after = strategy.module.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)  # the base model stayed frozen
    assert any("lora_B" in k for k in changed)

    out = tmp_path / "sft_train"
    strategy.save_hf(out, load_tokenizer(tiny_model_dir), final=True)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    ids = _batch(9).input_ids
    strategy.module.eval()
    with torch.no_grad():
        expected = strategy.module(input_ids=ids).logits
        adapter = AutoModelForCausalLM.from_pretrained(out)  # base from adapter_config + adapter
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "sft_train-merged")
        assert not any("lora" in k for k in merged.state_dict())
        torch.testing.assert_close(adapter(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    # Each checkpoint's adapter is an MLflow model too (its registered version loads): base + adapter.
    import mlflow

    from sft_core.tracking.mlflow_model import write_mlflow_model

    write_mlflow_model(out)
    loaded = mlflow.transformers.load_model(str(out), return_type="components")["model"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lora_resume_state_holds_only_the_adapter_and_continues_exactly(tiny_model_dir, tmp_path):
    a = _strategy(tiny_model_dir, LORA)
    a.train_step([_batch(1)], num_targets=32)
    state, hf = _save_checkpoint(a, tmp_path, tiny_model_dir)
    saved = sum(f.stat().st_size for f in (state / "dcp").iterdir())
    full = sum(v.numel() * v.element_size() for v in a.module.state_dict().values())
    assert saved < full / 4, (saved, full)  # adapter + its Adam moments, not the frozen base
    expected = a.train_step([_batch(2)], num_targets=32)
    b = _strategy(tiny_model_dir, LORA)
    b.load_state(state, hf)
    got = b.train_step([_batch(2)], num_targets=32)
    assert got.loss_sum == expected.loss_sum and got.grad_norm == expected.grad_norm
    for (k, v), w in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


def test_lora_target_modules_are_checked_against_the_model_before_workers_start(tiny_model_dir):
    """A misspelt module was dropped unseen by peft where another name matched (or failed in every
    worker with a traceback where none did); `lm_head` on a model with tied embeddings merged its
    delta into the input embeddings too (merged vs base + adapter: max |logit diff| 0.45)."""
    from sft_core.config import LoraArgs
    from sft_core.errors import ConfigError
    from sft_core.model.lora import check_targets

    check_targets(LoraArgs(target_modules=["q_proj", "v_proj"]), str(tiny_model_dir))
    check_targets(LoraArgs(target_modules="all-linear"), str(tiny_model_dir))
    with pytest.raises(ConfigError, match=(
        r"config key 'sft_train.model_args.lora.target_modules': \['vproj'\] name no module of .*"
        r"\(its weights' modules: .*q_proj.*v_proj"
    )):  # fmt: skip
        check_targets(LoraArgs(target_modules=["q_proj", "vproj"]), str(tiny_model_dir))
    with pytest.raises(
        ConfigError, match=r"\['lm_head'\] in a model whose LM head and input embeddings share"
    ):
        check_targets(LoraArgs(target_modules=["q_proj", "lm_head"]), str(tiny_model_dir))
