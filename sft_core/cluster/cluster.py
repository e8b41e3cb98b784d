"""Cluster: one Ray actor per device_mapping entry, driven in lockstep.

The Ray runtime must already be up: locally the Prefect flow's RayTaskRunner starts it; to run on
several machines start Ray there (`ray start --head` on one, `ray start --address=HEAD:6379` on the
others) and set RAY_ADDRESS=HEAD:6379 before `sft run`: the workers are then spread by Ray and
rank 0's node address is the torch.distributed master.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from sft_core.config import SFTConfig
from sft_core.train.worker import SFTWorker

# Passed to each actor so it sees the same Prefect server, caches and thread settings as the driver.
_FORWARDED_ENV = (
    "SFT_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "SFT_PEAK_FLOPS",
    "TOKENIZERS_PARALLELISM",
)


class Cluster:
    def __init__(self, cfg: SFTConfig, artifacts: dict[str, Any]):
        if not ray.is_initialized():
            raise RuntimeError("Cluster needs a running Ray runtime (the flow's RayTaskRunner starts one)")
        self.name = cfg.sft_train.name
        self.world_size = cfg.sft_train.world_size
        use_gpu = bool(ray.cluster_resources().get("GPU", 0))
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        env.update(cfg.system_envs)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # CPU workers claim no Ray CPU slot: the Prefect tasks running on Ray must still be schedulable.
        options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 0}
        actor_cls = ray.remote(SFTWorker)
        cfg_dict = cfg.model_dump()
        self.workers = [
            actor_cls.options(name=None, runtime_env={"env_vars": env}, **options).remote(
                cfg_dict, rank, self.world_size, artifacts
            )
            for rank in range(self.world_size)
        ]
        addr, port = ray.get(self.workers[0].address.remote())
        ray.get([w.setup_distributed.remote(addr, port) for w in self.workers])

    def execute_all(self, method: str, *args: Any) -> list[Any]:
        """Call `method` on every worker at once and wait for all results (rank order).

        Fails as soon as any worker fails or dies: the others may be blocked in a collective with it
        and would otherwise hold the run until the process-group timeout.
        """
        refs = [getattr(w, method).remote(*args) for w in self.workers]
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)  # raises the worker's error (RayActorError if its process died)
        return ray.get(refs)

    def shutdown(self) -> None:
        """Kill the actors: their process exit releases the process group, even mid-collective."""
        for w in self.workers:
            ray.kill(w)
