"""ddp_train's wrap skips DDP's copy of rank 0's weights to the other ranks only where every rank
already holds the same weights; where they differ, the copy is made and the ranks agree after it.
Two real gloo ranks (processes), the strategy's own `_wrap`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sft_core.cluster.rendezvous import free_port


def _rank(rank: int, port: int, out: Path, differ: bool) -> None:
    from sft_core.config_loader import load_config
    from sft_core.strategies.base import DistContext
    from sft_core.strategies.ddp import replicas_agree
    from sft_core.strategies.registry import create_strategy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    import torch.nn.parallel.distributed as ddp_module

    syncs = []
    sync = ddp_module._sync_module_states  # counted: the broadcast of rank 0's weights and buffers
    ddp_module._sync_module_states = lambda *a, **kw: (syncs.append(1), sync(*a, **kw))[1]
    cfg = load_config(
        "sft_config", ["+experiment=smoke", "sft_train.device_mapping=[0,1]"], base_dir=Path(os.getcwd())
    )
    strategy = create_strategy(cfg, DistContext(rank, 2, torch.device("cpu")))
    torch.manual_seed(rank if differ else 0)  # differ: each rank's own random weights
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16))
    model[1].register_buffer("scale", torch.rand(4))
    agreed_before = replicas_agree(model)
    strategy._wrap(model)
    torch.save(
        {"agreed_before": agreed_before, "syncs": len(syncs), "state": model.state_dict()}, out / f"{rank}.pt"
    )
    dist.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True], ids=["same-weights", "different-weights"])
def test_ddp_copies_rank_0s_weights_only_where_the_ranks_differ(tmp_path, differ):
    mp.spawn(_rank, args=(free_port(), tmp_path, differ), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["agreed_before"] is r1["agreed_before"] is (not differ)
    assert r0["syncs"] == r1["syncs"] == (1 if differ else 0)
    assert r0["state"].keys() == r1["state"].keys()
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"{key} differs between the ranks after the wrap"
