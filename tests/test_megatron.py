"""megatron_train: the HF <-> megatron mapping, the CPU shim, layout checks, and megatron-core really
training (gloo, real Ray actors) with the same losses in every parallel layout."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from sft_core.config import ConfigError, check_runnable
from sft_core.config_loader import load_config
from sft_core.model import megatron_bridge as bridge
from sft_core.strategies.megatron import cpu_shim as shim
from tests.helpers import encoded_demo, train_on_cluster

MEGATRON = "sft_train.strategy_args.strategy_name=megatron_train"


def megatron_overrides(**layout: object) -> list[str]:
    return [MEGATRON, *(f"+sft_train.strategy_args.strategy_config.{k}={v}" for k, v in layout.items())]


def save_model(out: Path, kind: str, layers: int = 2) -> Path:
    """A tiny random model whose every tensor differs from its neighbours' (norm weights and q/k/v
    biases randomized too), so a swapped or misplaced tensor changes the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=2,
    )
    torch.manual_seed(1)
    if kind == "qwen2":  # q/k/v biases, untied output layer, another rope theta
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False, rope_theta=50000.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


# -- weight mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_to_megatron_to_hf_is_exact(kind, llama_dir, qwen2_dir):
    from transformers import AutoConfig

    from sft_core.model.load import load_hf_state_dict

    folder = llama_dir if kind == "llama" else qwen2_dir
    shape = bridge.gpt_shape(AutoConfig.from_pretrained(folder))
    hf = load_hf_state_dict(folder)
    back = bridge.megatron_to_hf(bridge.hf_to_megatron(hf, shape), shape)
    expected = {k for k in hf if not (shape.tied_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    for key in expected:
        assert torch.equal(back[key], hf[key]), key
    assert shape.qkv_bias == (kind == "qwen2") and shape.tied_embeddings == (kind == "llama")


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_pieces_reassemble_and_keep_whole_query_groups(tp, qwen2_dir):
    from transformers import AutoConfig

    from sft_core.model.load import load_hf_state_dict

    hf = load_hf_state_dict(qwen2_dir)
    shape = bridge.gpt_shape(AutoConfig.from_pretrained(qwen2_dir))
    shape = bridge.GPTShape(**{**shape.__dict__, "num_query_groups": 4})  # 4 groups: TP up to 4
    hf = dict(hf)
    for proj in ("k_proj", "v_proj"):  # widen k/v to 4 groups for this check
        for suffix in ("weight", "bias"):
            key = f"model.layers.0.self_attn.{proj}.{suffix}"
            hf[key] = torch.cat([hf[key], hf[key] + 1])
    full = bridge.hf_to_megatron(
        {k: v for k, v in hf.items() if "layers.1." not in k},
        shape.__class__(**{**shape.__dict__, "num_layers": 1}),
    )
    for name, tensor in full.items():
        pieces = [bridge.shard_for_rank(name, tensor, r, tp) for r in range(tp)]
        assert torch.equal(bridge.unshard(name, pieces), tensor), name
    # Rank r's linear_qkv holds query group(s) r*4/tp...: its q heads with their own k and v.
    q = hf["model.layers.0.self_attn.q_proj.weight"].reshape(4, 16, 64)  # 4 groups x 1 head x 16
    k = hf["model.layers.0.self_attn.k_proj.weight"].reshape(4, 16, 64)
    piece = bridge.shard_for_rank("decoder.layers.0.self_attention.linear_qkv.weight",
                                  full["decoder.layers.0.self_attention.linear_qkv.weight"], 1, tp)  # fmt: skip
    first_group = 4 // tp
    assert torch.equal(piece[:16], q[first_group]) and torch.equal(piece[16:32], k[first_group])
    # linear_fc1: each rank holds its slice of gate, then its slice of up.
    fc1 = bridge.shard_for_rank(
        "decoder.layers.0.mlp.linear_fc1.weight", full["decoder.layers.0.mlp.linear_fc1.weight"], 0, tp
    )
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(fc1, torch.cat([gate.chunk(tp)[0], up.chunk(tp)[0]]))


def test_unsupported_architectures_are_refused_by_name(qwen2_dir):
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    with pytest.raises(Exception, match="model types llama, qwen2, mistral; this model is 'gpt2'"):
        bridge.gpt_shape(GPT2Config())
    with pytest.raises(Exception, match="RoPE scaling 'llama3' is not mapped"):
        bridge.gpt_shape(LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}))  # fmt: skip
    with pytest.raises(Exception, match="MLP biases"):
        bridge.gpt_shape(LlamaConfig(mlp_bias=True))
    assert bridge.gpt_shape(AutoConfig.from_pretrained(qwen2_dir)).rope_theta == 50000.0


# -- layout checks, before any worker starts -------------------------------------------------------


def load(*overrides: str):
    return load_config("sft_config", ["+experiment=smoke", *overrides], base_dir=Path.cwd())


def test_data_parallel_size_and_global_batch_follow_from_the_layout():
    cfg = load(*megatron_overrides(tensor_model_parallel_size=2), "sft_train.device_mapping=[0,1,2,3]")
    assert cfg.data_parallel_size == 2
    assert cfg.global_batch_size == 2 * 2 * 2  # micro 2 x accumulation 2 x 2 replicas
    assert load("sft_train.device_mapping=[0,1,2,3]").data_parallel_size == 4  # ddp: every worker


def test_impossible_layouts_stop_with_a_message(llama_dir):
    with pytest.raises(ConfigError, match=r"3 workers cannot be split .* 2 x 1 x 1 = 2"):
        load(*megatron_overrides(tensor_model_parallel_size=2), "sft_train.device_mapping=[0,1,2]")
    with pytest.raises(
        ConfigError,
        match=r"strategy_config.tensor_model_paralel_size': unknown key \(did you mean 'tensor_model_parallel_size'",
    ):
        load(MEGATRON, "+sft_train.strategy_args.strategy_config.tensor_model_paralel_size=2")
    with pytest.raises(
        ConfigError, match="virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2"
    ):
        load(*megatron_overrides(virtual_pipeline_model_parallel_size=2))
    with pytest.raises(ConfigError, match="take effect only with recompute_granularity 'full'"):
        load(*megatron_overrides(recompute_method="uniform"))  # alone it would do nothing, unseen
    with pytest.raises(ConfigError, match="applies to megatron_train only"):
        load("+sft_train.strategy_args.strategy_config.tensor_model_parallel_size=2")

    def layout(workers: int = 4, **kw: int):
        return load(
            *megatron_overrides(**kw), f"sft_train.device_mapping={list(range(workers))}"
        ).strategy_config

    with pytest.raises(
        ConfigError,
        match=r"key/value heads \(query groups\) \(2\) not divisible by tensor_model_parallel_size \(4\)",
    ):
        bridge.check_model_layout(layout(tensor_model_parallel_size=4), llama_dir)
    with pytest.raises(
        ConfigError, match=r"attention heads \(4\) not divisible by tensor_model_parallel_size \(3\)"
    ):
        bridge.check_model_layout(layout(3, tensor_model_parallel_size=3), llama_dir)
    with pytest.raises(
        ConfigError, match=r"layers \(2\) not divisible by pipeline_model_parallel_size x virtual \(2 x 2\)"
    ):
        bridge.check_model_layout(
            layout(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2), llama_dir
        )
    bridge.check_model_layout(layout(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), llama_dir)

    cp = load(*megatron_overrides(context_parallel_size=2))
    with pytest.raises(ConfigError, match="context parallelism needs .* Transformer Engine"):
        check_runnable(cp, devices=("cpu", 2))  # fmt: skip


# -- the CPU shim ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inactive where CUDA exists (tested below)")
def test_shim_runs_megatron_cuda_code_on_cpu_and_undoes_its_tensor_patches():
    from megatron.core.transformer import utils as mg_utils

    shim.install()
    mask = mg_utils.get_default_causal_mask(4)  # megatron allocates it with device="cuda"
    assert mask.device.type == "cpu" and mask.tolist()[0] == [False, True, True, True]
    assert torch.ones(1).type() == "torch.FloatTensor"
    with shim.active():
        x = torch.ones(2)
        assert x.cuda() is x and x.type() == "torch.cuda.FloatTensor"
        assert x.type(torch.float64).dtype == torch.float64  # conversions still work
    assert torch.ones(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.ones(1).cuda()
    with pytest.raises(ValueError), shim.active():
        raise ValueError("restores the patches on the way out")
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_shim_is_inactive_where_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not shim.needed()
    original = torch.Tensor.cuda
    with shim.active():
        assert torch.Tensor.cuda is original


# -- numerics: megatron forward == HF forward ------------------------------------------------------


@pytest.fixture(scope="module")
def process_group():
    import torch.distributed as dist

    from flows.runtime import free_port

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_megatron_logits_equal_hf_logits_on_packed_rows(kind, llama_dir, qwen2_dir, process_group):
    from sft_core.model.load import load_causal_lm
    from sft_core.strategies.base import DistContext
    from sft_core.strategies.megatron.batches import block_causal_mask
    from sft_core.strategies.megatron.strategy import MegatronStrategy

    folder = llama_dir if kind == "llama" else qwen2_dir
    strategy = MegatronStrategy(
        load(MEGATRON, "sft_train.device_mapping=[0]"), DistContext(0, 1, torch.device("cpu"))
    )
    strategy.initialize(folder, total_steps=1)
    hf = load_causal_lm(folder, torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (2, 48))
    # Row 0 packs samples of 20 and 28 tokens, row 1 one sample of 48.
    positions = torch.stack([torch.cat([torch.arange(20), torch.arange(28)]), torch.arange(48)])
    with torch.no_grad(), shim.active():
        logits = strategy.modules[0](ids, positions, block_causal_mask(positions))
        reference = hf(input_ids=ids, position_ids=positions).logits
        separate = hf(input_ids=ids[:1, 20:]).logits  # the second packed sample on its own
    assert (logits - reference).abs().max() < 1e-4
    assert (logits[0, 20:] - separate[0]).abs().max() < 1e-4  # nothing leaked across the boundary
    exported = strategy.full_state_dict()
    for key, value in hf.state_dict().items():
        if key == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        assert torch.equal(exported[key], value), key


def test_sdpa_core_attention_equals_megatrons_dot_product_attention(llama_dir, process_group):
    """The core attention the layer spec uses against the one it replaces: grouped-query heads,
    packed rows, a padding tail; outputs and the gradients of query, key and value agree."""
    from megatron.core import parallel_state
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from transformers import AutoConfig

    from sft_core.model.megatron_bridge import gpt_shape
    from sft_core.strategies.megatron.attention import SdpaAttention
    from sft_core.strategies.megatron.batches import block_causal_mask
    from sft_core.strategies.megatron.layout import MegatronConfig
    from sft_core.strategies.megatron.model import transformer_config

    with shim.active():
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel()
        config = transformer_config(gpt_shape(AutoConfig.from_pretrained(llama_dir)), MegatronConfig(),
                                    torch.float32)  # fmt: skip
        kwargs = dict(
            config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
        )
        ours, reference = SdpaAttention(**kwargs), DotProductAttention(**kwargs)
        torch.manual_seed(0)
        s, b, d = 40, 2, config.kv_channels
        q = torch.randn(s, b, config.num_attention_heads, d, requires_grad=True)
        k, v = (torch.randn(s, b, config.num_query_groups, d, requires_grad=True) for _ in range(2))
        # Row 0: samples of 15 and 20 tokens and 5 of padding (a sample of its own); row 1: one of 40.
        positions = torch.stack(
            [torch.cat([torch.arange(15), torch.arange(20), torch.arange(5)]), torch.arange(s)]
        )
        mask = block_causal_mask(positions)
        outputs, grads = [], []
        for attention in (ours, reference):
            out = attention(q, k, v, mask)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outputs.append(out.detach())
            grads.append([t.grad.clone() for t in (q, k, v)])
            for t in (q, k, v):
                t.grad = None
    assert outputs[0].shape == (s, b, config.num_attention_heads * d)
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
    for g_ours, g_reference in zip(*grads, strict=True):
        assert (g_ours - g_reference).abs().max() < 1e-5


def test_activation_recompute_trains_bit_identically(llama_dir, process_group):
    """Selective recompute (the core attention re-run in the backward) and full recompute give the
    losses and gradient norms of a run that keeps every activation, bit for bit, over three steps."""
    from sft_core.data.collate import MicroBatch
    from sft_core.strategies.base import DistContext
    from sft_core.strategies.megatron.strategy import MegatronStrategy

    def run(**layout: object) -> list[tuple[float, float]]:
        cfg = load(*megatron_overrides(**layout), "sft_train.device_mapping=[0]")
        strategy = MegatronStrategy(cfg, DistContext(0, 1, torch.device("cpu")))
        strategy.initialize(llama_dir, total_steps=3)
        attention: Any = strategy.modules[0].decoder.layers[0].self_attention
        assert attention.checkpoint_core_attention == (layout.get("recompute_granularity") == "selective")
        assert attention.config.recompute_granularity == layout.get("recompute_granularity")
        generator = torch.Generator().manual_seed(0)
        stats = []
        for _ in range(3):
            ids = torch.randint(0, 49152, (2, 48), generator=generator)
            positions = torch.cat([torch.arange(20), torch.arange(28)]).repeat(2, 1)
            labels = ids.clone()
            labels[:, :5] = -100
            out = strategy.train_step([MicroBatch(ids, labels, positions, real_tokens=96)], 2 * 42)
            stats.append((out.loss_sum, out.grad_norm))
        return stats

    kept = run()
    assert run(recompute_granularity="selective") == kept
    assert run(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) == kept


def test_cpu_bf16_autocast_trains_megatron_close_to_fp32(llama_dir, smollm2_tokenizer, tmp_path, monkeypatch,
                                                        process_group):  # fmt: skip
    """Autocast spans megatron's backward too (its linear layers' backward restores autocast for
    CUDA only): bf16 steps run and track fp32 within test_bf16's tolerance, weights stay fp32.
    Forced where the CPU lacks native bf16 (slower there, the same numbers)."""
    import json

    from sft_core.data.collate import collate_rows
    from sft_core.data.packing import PackedPlan
    from sft_core.data.store import EncodedData
    from sft_core.strategies import precision
    from sft_core.strategies.base import DistContext
    from sft_core.strategies.megatron.strategy import MegatronStrategy
    from tests.test_bf16 import BF16_LOSS_RTOL

    artifacts = encoded_demo(tmp_path, smollm2_tokenizer, llama_dir, packing=True)
    data = EncodedData.load(artifacts.train.encoded)
    plan = PackedPlan.from_dict(json.loads(Path(artifacts.train.plan).read_text()))
    batches = [collate_rows(data, plan, [r], int(smollm2_tokenizer.pad_token_id)) for r in range(3)]
    losses = {}
    for dtype in ("fp32", "bf16"):
        monkeypatch.setenv("SFT_CPU_BF16", "1")
        precision.cpu_supports_bf16.cache_clear()
        cfg = load(MEGATRON, "sft_train.device_mapping=[0]", f"sft_train.model_args.dtype={dtype}")
        strategy = MegatronStrategy(cfg, DistContext(0, 1, torch.device("cpu")))
        assert strategy.cpu_autocast == (torch.bfloat16 if dtype == "bf16" else None)
        torch.manual_seed(0)
        strategy.initialize(llama_dir, total_steps=3)
        outs = [strategy.train_step([b], int((b.labels[:, 1:] != -100).sum())) for b in batches]
        losses[dtype] = [out.loss_sum / out.targets for out in outs]
        assert {p.dtype for m in strategy.modules for p in m.parameters()} == {torch.float32}
    # Sequence parallel is the exception: megatron's backward reduce-scatters into a buffer of the
    # weights' dtype, so that layout trains in fp32 on CPU (and its MFU uses the fp32 peak).
    sp = load(
        *megatron_overrides(tensor_model_parallel_size=2, sequence_parallel=True),
        "sft_train.model_args.dtype=bf16",
    )
    assert MegatronStrategy(sp, DistContext(0, 2, torch.device("cpu"))).cpu_autocast is None
    assert MegatronStrategy.compute_dtype(sp, torch.device("cpu")) == torch.float32
    # So do pipeline stages: megatron receives a stage's activations into buffers of the weights'
    # dtype, and bf16 activations read as fp32 gave val_loss 13.5 for 1.47 (SmolLM2, PP=2).
    pp = load(*megatron_overrides(pipeline_model_parallel_size=2), "sft_train.model_args.dtype=bf16")
    assert MegatronStrategy(pp, DistContext(0, 2, torch.device("cpu"))).cpu_autocast is None
    assert MegatronStrategy.compute_dtype(pp, torch.device("cpu")) == torch.float32
    precision.cpu_supports_bf16.cache_clear()
    assert losses["bf16"] != losses["fp32"], "bf16 autocast was not active"
    for step, (a, b) in enumerate(zip(losses["bf16"], losses["fp32"], strict=True)):
        assert abs(a - b) / b < BF16_LOSS_RTOL, f"step {step}: bf16 {a:.5f} vs fp32 {b:.5f}"


# -- training on real Ray actors: every layout gives the single-process losses ---------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir, smollm2_tokenizer) -> dict:
    out = tmp_path_factory.mktemp("megatron-data")
    # Packed rows: several samples per row, so the block-diagonal mask is exercised too.
    artifacts = encoded_demo(out, smollm2_tokenizer, tiny_model_dir, packing=True)
    return replace(artifacts, model_dir=str(save_model(out / "model", "llama", layers=4)))


STEPS = 5


def train(artifacts: dict, workers: int, micro: int, accumulation: int, *overrides: str):
    cfg = load(
        f"sft_train.device_mapping={list(range(workers))}",
        f"sft_train.training_args.per_device_train_batch_size={micro}",
        f"sft_train.training_args.gradient_accumulation_steps={accumulation}",
        f"sft_train.training_args.max_steps={STEPS}",
        "sft_train.training_args.learning_rate=1e-4",
        "sft_train.training_args.max_grad_norm=1.0",  # the gradient norm is above 1: clipping is active
        *overrides,
    )
    return train_on_cluster(cfg, artifacts, STEPS)


@pytest.mark.slow
def test_parallel_layouts_reproduce_the_single_process_run(artifacts):
    import ray

    ray.init(
        "local", num_cpus=2, include_dashboard=False, logging_level="warning"
    )  # never a `ray start` cluster
    try:
        ref_weights, ref_losses, ref_norms = train(artifacts, 1, 8, 1, MEGATRON)
        layouts = {
            "TP=2": train(artifacts, 2, 8, 1, *megatron_overrides(tensor_model_parallel_size=2)),
            "TP=2 + sequence parallel": train(artifacts, 2, 8, 1, *megatron_overrides(tensor_model_parallel_size=2, sequence_parallel=True)),
            "PP=2 (1F1B, 4 micro-batches)": train(artifacts, 2, 2, 4, *megatron_overrides(pipeline_model_parallel_size=2)),
            "PP=2 x VPP=2 (interleaved)": train(artifacts, 2, 2, 4, *megatron_overrides(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
            "DP=2 + distributed optimizer": train(artifacts, 2, 2, 2, *megatron_overrides(use_distributed_optimizer=True)),
            "ddp_train, 1 worker": train(artifacts, 1, 8, 1),
        }  # fmt: skip
    finally:
        ray.shutdown()
    from safetensors.torch import load_file

    initial = load_file(str(Path(artifacts.model_dir) / "model.safetensors"))
    key = "model.layers.3.mlp.up_proj.weight"
    assert (ref_weights[key] - initial[key]).abs().max() > 5e-5, "training did not move the weights"
    assert min(ref_norms) > 1.0, "clipping was not exercised"
    for name, (weights, losses, norms) in layouts.items():
        assert losses == pytest.approx(ref_losses, rel=1e-5), name
        assert norms == pytest.approx(ref_norms, rel=1e-5), name  # float64 norms: layout-independent
        # (HF's state dict also lists the tied lm_head.weight; megatron exports the tensor once.)
        assert weights.keys() - {"lm_head.weight"} == ref_weights.keys(), name
        for key, ref in ref_weights.items():
            diff = (weights[key] - ref).norm() / ref.norm()
            assert diff < 1e-5, f"{name}: {key} differs by {diff:.2e} (relative)"


# -- the whole pipeline ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_with_pipeline_parallel_megatron(prefect_server, tmp_path, demo_copy):
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import checkpoint_path
    from tests.test_pipeline import flow_run_id, smoke, task_states

    result, out = smoke(tmp_path, demo_copy, *megatron_overrides(pipeline_model_parallel_size=2))
    states = task_states(flow_run_id(result.stdout))
    # Encoding and packing do not depend on the strategy: another test may have cached them.
    data_stages = ("encode-", "pack-")
    assert all(s in ("Completed", "Cached") for n, s in states.items() if n.startswith(data_stages)), states
    assert all(s == "Completed" for n, s in states.items() if not n.startswith(data_stages)), states
    assert any(n.startswith("train-steps-3-6") for n in states), sorted(states)
    assert sum(n.startswith("val-step") for n in states) == 3
    assert "2 workers" in result.stdout + result.stderr

    # Each checkpoint: a Hugging Face folder gathered from both pipeline stages, beside megatron's
    # per-rank state for exact resume.
    ckpt = checkpoint_path(out, 6)
    assert {p.name for p in (ckpt / "train_state").iterdir()} == {"megatron_rank0.pt", "megatron_rank1.pt"}
    model = AutoModelForCausalLM.from_pretrained(ckpt / "sft_train")
    tok = AutoTokenizer.from_pretrained(ckpt / "sft_train")
    initial = AutoModelForCausalLM.from_pretrained(Path(".sft/models/tiny-smollm2").resolve())
    for key, value in initial.state_dict().items():  # every layer trained, on both stages
        if key.endswith("proj.weight"):
            assert not torch.equal(model.state_dict()[key], value), f"{key} did not change"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]

    uri = f"sqlite:///{out}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("smoke-sft", "last_saved")
    assert mv.tags["global_step"] == "6"
    run = client.get_run(mv.run_id)
    assert run.data.params["sft_train.strategy_args.strategy_name"] == "megatron_train"
    loss = client.get_metric_history(mv.run_id, "sft_train/loss")
    assert [m.step for m in loss] == [1, 2, 3, 4, 5, 6] and all(0 < m.value < 20 for m in loss)
    assert [m.step for m in client.get_metric_history(mv.run_id, "sft_train/val_loss")] == [0, 3, 6]
    for name in ("sft_train/grad_norm", "sft_train/tokens_per_sec", "sft_train/mfu", "time/fwd_bwd"):
        assert client.get_metric_history(mv.run_id, name), name
