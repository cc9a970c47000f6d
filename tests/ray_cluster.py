"""A real multi-node Ray cluster on this machine, for the Ray runtime's tests.

A head and two worker nodes (separate raylets, each with its own processes), each with a custom
resource naming it, so a test can ask for one node. Module-scoped: Ray start-up is slow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import pytest

from shoal import serve


@dataclass
class RayCluster:
    cluster: Any
    nodes: dict  # "head" / "w1" / "w2" -> ray's Node object (its .node_id is the hex id replicas report)

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id


def ray_cluster_fixture():
    """A module fixture: the cluster, with shoal started on it (SHOAL_RUNTIME=ray while it lives)."""

    @pytest.fixture(scope="module")
    def ray_cluster():
        ray = pytest.importorskip("ray")
        from ray.cluster_utils import Cluster

        # A private Ray temp dir: a cluster records itself in <tmp>/ray/ray_current_cluster, which a
        # plain ray.init() elsewhere on this machine (another test run, a benchmark) would then join.
        old_tmp = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="shoal-ray-", dir="/tmp")
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "resources": {"head": 1}, "include_dashboard": False})
        nodes = {"head": cluster.head_node,
                 "w1": cluster.add_node(num_cpus=2, resources={"w1": 1}),
                 "w2": cluster.add_node(num_cpus=2, resources={"w2": 1})}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        old = os.environ.get("SHOAL_RUNTIME")
        os.environ["SHOAL_RUNTIME"] = "ray"  # serve.run without serve.start also lands on the cluster
        try:
            yield RayCluster(cluster, nodes)
        finally:
            serve.shutdown()
            if old is None:
                os.environ.pop("SHOAL_RUNTIME", None)
            else:
                os.environ["SHOAL_RUNTIME"] = old
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
            if old_tmp is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = old_tmp

    return ray_cluster
