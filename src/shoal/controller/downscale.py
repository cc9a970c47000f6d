"""Which replicas stop first when a deployment has more than its target: Ray Serve's order.

On a cluster the order decides whether scaling down frees a node. Stopping one replica on each of
three nodes leaves three half-used nodes, none of which Ray's autoscaler can remove; stopping all
of one node's replicas leaves it idle, and the autoscaler removes it after its idle timeout. So, as
Ray Serve (its deployment scheduler's downscale ranking, and the replicas pending migration that
its deployment state stops first):

1. replicas on a node the cluster drains (they are moving off it anyway);
2. replicas not serving yet: those still waiting in the controller for resources, then those
   launched but without a node (waiting for the cluster to add one: stopping them withdraws that
   demand), then those starting on a node; newest first within each;
3. serving replicas of an older code version (a rollout replaces them anyway; shoal's addition,
   Ray ranks by node only);
4. serving replicas by node: the head node's last (it never goes), then the nodes with the fewest
   serving replicas of *every* deployment first, so the emptiest node empties; within a node the
   newest replica first.

A pure function of plain data, so it is tested without processes (tests/test_downscale_order_unit.py).
On one machine every replica is on the node "local" and there is no head node: the order is then
1-3, then the newest serving replica first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Optional


@dataclass(frozen=True)
class StopCandidate:
    """One replica that may be stopped, as the ranking sees it."""

    key: str
    node: str = ""  # the node it runs (or was launched) on; "" : none yet
    serving: bool = False  # RUNNING or UPDATING
    placed: bool = True  # launched (False: still waiting in the controller for resources)
    draining: bool = False  # its node is being drained
    outdated: bool = False  # an older code version than the deployment's
    started: float = 0.0  # when it was placed (launched): the newest stops first


def stop_order(candidates: Iterable[StopCandidate], node_load: Mapping[str, int],
               head_node: Optional[str] = None) -> list[str]:
    """The candidates' keys, the one to stop first first.

    `node_load`: node -> how many serving replicas (of every deployment) run there; a node not in
    it counts 0. `head_node`: the cluster's head (its replicas stop last), None where there is none.
    """

    def rank(c: StopCandidate) -> tuple:
        # (group, order within the group, node load, node, newest first)
        if c.draining:
            return (0, 0, 0, "", -c.started)
        if not c.serving:
            return (1, 0 if not c.placed else (1 if not c.node else 2), 0, "", -c.started)
        if c.outdated:
            return (2, 0, 0, "", -c.started)
        on_head = head_node is not None and c.node == head_node
        return (3, int(on_head), node_load.get(c.node, 0), c.node, -c.started)

    return [c.key for c in sorted(candidates, key=rank)]
