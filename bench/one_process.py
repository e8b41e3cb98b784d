"""What the one-process benchmarks share: the demo's train rows packed for a model, and a ddp_train
strategy of one worker on the CPU, as a Ray actor runs it (head_at_targets.py, host_memory.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def demo_rows(model: str, seq: int) -> tuple[Path, Any, Any, int]:
    """(model folder, encoded data, packing plan, pad id): 400 demo rows packed to `seq` tokens."""
    from sft_core.data.encode import encode_files
    from sft_core.data.messages import FieldMapping
    from sft_core.data.packing import plan_rows
    from sft_core.data.spec import EncodeSpec
    from sft_core.model.resolve import load_tokenizer, resolve_pretrained

    model_dir = resolve_pretrained(model)
    tok = load_tokenizer(model_dir)
    spec = EncodeSpec(seq, fields=FieldMapping(query_key="input"))
    data, _ = encode_files([str(REPO / "data/demo/train.jsonl")], tok, spec, limit=400)
    return model_dir, data, plan_rows(data, seq, True), int(tok.pad_token_id)


def cpu_strategy(model_dir: Path, bf16: bool, total_steps: int) -> Any:
    """A ddp_train strategy of one worker, seeded, its model loaded; fp32 or bf16 autocast."""
    import torch

    from sft_core.config_loader import load_config
    from sft_core.strategies.base import DistContext
    from sft_core.strategies.registry import create_strategy

    dtype = "bf16" if bf16 else "fp32"
    cfg = load_config("sft_config", ["sft_train.device_mapping=[0]", f"sft_train.model_args.dtype={dtype}"])
    torch.manual_seed(0)
    strategy = create_strategy(cfg, DistContext(0, 1, torch.device("cpu")))
    strategy.initialize(model_dir, total_steps=total_steps)
    assert (strategy.autocast_dtype is not None) == bf16, "no native bf16 on this CPU"
    return strategy
