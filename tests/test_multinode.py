"""Two Ray nodes on this machine (Ray's own multi-node test cluster): the workers spread over both,
rank 0's node is the rendezvous address, every worker checks it sees the shared files, and the
result equals the single-node run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import ray
import torch

from flows.cluster_launch import ClusterLaunch
from sft_core.config_loader import load_config
from sft_core.train.artifacts import SplitFiles
from tests.helpers import encoded_demo, train_on_cluster

pytestmark = pytest.mark.slow
STEPS = 3


def config(placement: str):
    return load_config(
        "sft_config",
        [
            "+experiment=smoke",
            "sft_train.device_mapping=[0,1]",
            f"sft_train.placement={placement}",
            f"sft_train.training_args.max_steps={STEPS}",
            "sft_train.training_args.learning_rate=1e-4",
        ],
        base_dir=Path.cwd(),
    )


def test_workers_spread_over_two_nodes_train_like_one_node(
    tmp_path, tiny_model_dir, smollm2_tokenizer, monkeypatch
):
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster as RayTestCluster

    from sft_core.cluster.cluster import Cluster

    artifacts = encoded_demo(tmp_path, smollm2_tokenizer, tiny_model_dir, packing=True)
    artifacts = artifacts.with_shared_dir(str(tmp_path))

    # Every node and the driver on loopback: Ray otherwise swaps 127.0.0.1 for the host's routable
    # address when connecting, and the test cluster would be reachable from the network.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    nodes = RayTestCluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    )
    nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=nodes.address, logging_level="warning", _node_ip_address="127.0.0.1")
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cluster = Cluster(config("spread"))
        try:
            cluster.start(artifacts)
            placed = cluster.nodes
            assert len({n["node_id"] for n in placed}) == 2, placed  # ranks span the nodes
            assert cluster.master[0] == placed[0]["ip"]  # rank 0's node is the rendezvous address
            assert not list(tmp_path.glob(".probe-rank*"))  # the storage probe cleaned up after itself
        finally:
            cluster.shutdown()
        spread, spread_losses, _ = train_on_cluster(config("spread"), artifacts, STEPS)
    finally:
        ray.shutdown()
        nodes.shutdown()

    ray.init(
        "local", num_cpus=2, include_dashboard=False, logging_level="warning"
    )  # never a `ray start` cluster
    try:
        single, single_losses, _ = train_on_cluster(config("pack"), artifacts, STEPS)
    finally:
        ray.shutdown()
    assert spread_losses == pytest.approx(single_losses, rel=1e-6)
    for key, ref in single.items():
        torch.testing.assert_close(spread[key], ref, rtol=1e-6, atol=1e-7, msg=key)


def test_a_worker_that_cannot_see_the_data_is_named(tmp_path, tiny_model_dir, smollm2_tokenizer):
    from sft_core.cluster.cluster import Cluster

    artifacts = encoded_demo(tmp_path, smollm2_tokenizer, tiny_model_dir, packing=True)
    elsewhere = SplitFiles(
        str(tmp_path / "elsewhere" / "train.npz"), artifacts.train.plan
    )  # not on this node
    artifacts = replace(artifacts, train=elsewhere)
    ray.init(
        "local", num_cpus=2, include_dashboard=False, logging_level="warning"
    )  # never a `ray start` cluster
    try:
        with pytest.raises(Exception, match=r"rank \d on node \S+ cannot read .*elsewhere/train\.npz"):
            Cluster(config("pack")).start(artifacts)
        assert _nothing_reserved()

        # The flow launches the actors before its data is ready; a flow that fails before training
        # shuts them down (discard), and a launch is taken once.
        launch = ClusterLaunch(config("pack"))
        launch.discard()
        assert _nothing_reserved()
        launch = ClusterLaunch(config("pack"))
        cluster = launch.take()
        with pytest.raises(RuntimeError, match="taken already"):
            launch.take()
        launch.discard()  # not its to shut down any more
        assert not _nothing_reserved()
        cluster.shutdown()
        assert _nothing_reserved()
    finally:
        ray.shutdown()


def _nothing_reserved() -> bool:
    return all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
