"""SFTWorker as a Ray actor: where it runs, its view of shared storage, the rendezvous, and a
health ping answered while a long call runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from sft_core.cluster import rendezvous
from sft_core.cluster.worker import SFTWorker
from sft_core.strategies.registry import strategy_for
from sft_core.train.artifacts import TrainArtifacts


class SFTWorkerActor(SFTWorker):
    def address(self) -> tuple[str, int]:
        """(ip, free port) of this node, used by rank 0 as the torch.distributed master."""
        return ray.util.get_node_ip_address(), rendezvous.free_port()

    def setup_distributed(self, master_addr: str, master_port: int, store_path: str | None = None) -> None:
        strategy = strategy_for(self.cfg)
        self.ctx = rendezvous.join(
            self.rank,
            self.world_size,
            (master_addr, master_port),
            self.cfg.sft_train.worker_timeout_s,
            strategy.needs_process_group(self.world_size),
            store_path,
        )

    def node(self) -> dict[str, Any]:
        """Where this worker runs (Ray node id and address)."""
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address()}

    def use_artifacts(self, artifacts: TrainArtifacts) -> None:
        """Take the run's files: each must be readable here, and a probe written here (into the
        run folder) visible to the driver."""
        node = ray.util.get_node_ip_address()
        for p in artifacts.data_files():
            if not Path(p).is_file():
                raise FileNotFoundError(
                    f"rank {self.rank} on node {node} cannot read {p}: the data cache (SFT_HOME) must be "
                    "on storage every node shares"
                )
        if artifacts.shared_dir:
            (Path(artifacts.shared_dir) / f".probe-rank{self.rank}").write_text(node)
        super().use_artifacts(artifacts)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        """Answered from a second actor thread while a long call runs: proves the process is alive."""
        return self.rank
