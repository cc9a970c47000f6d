"""Where a replica goes on a Ray cluster: shoal prefers a node, Ray decides, and what fits no node now
becomes demand that Ray's autoscaler sees.

`Placement.choose` picks the node a replica should prefer: among the nodes with room for it, the one
with the fewest replicas of its deployment (then the fewest of shoal's in all), within
`max_replicas_per_node`. Room on a node is the lesser of two views: what Ray says is free there
(other Ray work counted), less what shoal reserved there since Ray said so; and the node's total
less everything shoal reserved there. The Ray runtime launches the actor with that node as a *soft*
preference, so Ray's scheduler has the last word: it may start the replica elsewhere when the node
filled up meanwhile, and `placed` then moves the accounting to where it runs.

When no node has room (or none is that big, or every node that fits already holds
`max_replicas_per_node` of the deployment), the reservation has no node and says what it waits for
(`Reservation.waiting`); the actor is launched all the same, with no node preference, so it stays
pending in Ray and Ray's autoscaler adds a node for it where the cluster can grow. It starts there.

No `ray` import here: the Ray runtime feeds it node views (`NodeView`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Optional

from shoal.runtime.base import RESOURCE_EPS, Reservation, ResourceRequest


@dataclass(frozen=True)
class NodeView:
    """One alive node, as Ray reports it."""

    node_id: str
    total: dict  # resource -> amount the node has
    available: Optional[dict] = None  # resource -> amount free now, by Ray's count (None: unknown)


@dataclass
class _Held:
    group: str
    node_id: str  # "" while it waits for a node
    resources: dict
    since: float  # monotonic time of the reservation (or of the move to its node)


def describe(resources: dict) -> str:
    """`CPU: 1, GPU: 0.5`: how status messages name a request."""
    return ", ".join(f"{k}: {v:g}" for k, v in resources.items()) or "no resources"


def _fits(have: dict, wanted: dict) -> bool:
    return all(have.get(k, 0.0) + RESOURCE_EPS >= v for k, v in wanted.items())


def _add(into: dict, resources: dict, sign: float = 1.0) -> None:
    for k, v in resources.items():
        into[k] = into.get(k, 0.0) + sign * v


class Placement:
    """shoal's reservations on a Ray cluster, per node; the node choice for a new replica."""

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}  # id(reservation) -> what it holds where

    # --- views (tests and status read them) ----------------------------------------------------
    def count(self, group: str, node_id: str) -> int:
        """Replicas of `group` (a deployment) reserved on `node_id` ("" : waiting for a node)."""
        return sum(1 for h in self._held.values() if h.group == group and h.node_id == node_id)

    def used(self, node_id: str) -> dict[str, float]:
        """Resources shoal's replicas reserved on `node_id`."""
        out: dict[str, float] = {}
        for h in self._held.values():
            if h.node_id == node_id:
                _add(out, h.resources)
        return out

    def nodes(self) -> set[str]:
        """The nodes shoal's replicas hold resources on (placed, or preferring them while starting)."""
        return {h.node_id for h in self._held.values() if h.node_id}

    def room(self, node: NodeView, seen_at: float) -> dict[str, float]:
        """What a new replica may still take on `node`; `seen_at` is when Ray reported `available`."""
        room = dict(node.total)
        _add(room, self.used(node.node_id), -1.0)
        if node.available is not None:
            recent: dict[str, float] = {}
            for h in self._held.values():
                if h.node_id == node.node_id and h.since > seen_at:
                    _add(recent, h.resources)
            for k in room:
                room[k] = min(room[k], node.available.get(k, 0.0) - recent.get(k, 0.0))
        return room

    # --- choosing ------------------------------------------------------------------------------
    def choose(self, request: ResourceRequest, nodes: list[NodeView], seen_at: float) -> Reservation:
        """The reservation for one replica of `request.group`: on a node, or waiting for one."""
        wanted = request.as_dict()
        parts = describe(wanted)
        able = [n for n in nodes if _fits(n.total, wanted)]
        if not able:
            return self._hold(Reservation(request, node_id="",
                                          waiting=f"{parts} (no node of the Ray cluster has that much now)"))
        counts = {n.node_id: self.count(request.group, n.node_id) for n in able}
        limit = request.max_replicas_per_node
        if limit:
            able = [n for n in able if counts[n.node_id] < limit]
            if not able:
                return self._hold(Reservation(request, node_id="", waiting=(
                    f"{parts} (every node that fits has {limit} replica(s) of the deployment, its "
                    f"max_replicas_per_node)")))
        roomy = [n for n in able if _fits(self.room(n, seen_at), wanted)]
        if not roomy:
            return self._hold(Reservation(request, node_id="",
                                          waiting=f"{parts} (every node that could hold it is full)"))
        totals = {n.node_id: sum(1 for h in self._held.values() if h.node_id == n.node_id) for n in roomy}
        best = min(roomy, key=lambda n: (counts[n.node_id], totals[n.node_id], random.random()))
        return self._hold(Reservation(request, node_id=best.node_id))

    def _hold(self, reservation: Reservation) -> Reservation:
        r = reservation.request
        self._held[id(reservation)] = _Held(r.group, reservation.node_id, r.as_dict(), time.monotonic())
        return reservation

    # --- the reservation's life ----------------------------------------------------------------
    def adopt(self, reservation: Reservation) -> None:
        """A replica a restarted controller adopts holds its resources again (where it runs)."""
        if not reservation.request.placement_group_bundles:
            self._hold(reservation)
        elif reservation.node_id:
            self._hold_group_replica(reservation)

    def placed(self, reservation: Reservation, node_id: str) -> None:
        """The replica started on `node_id`: it no longer waits, and holds its resources there."""
        reservation.node_id = node_id
        reservation.waiting = ""
        held = self._held.get(id(reservation))
        if held is None and reservation.request.placement_group_bundles:
            self._hold_group_replica(reservation)
        elif held is not None and held.node_id != node_id:
            held.node_id, held.since = node_id, time.monotonic()  # Ray's last view may not count it yet

    def _hold_group_replica(self, reservation: Reservation) -> None:
        """A replica in a placement group: Ray placed the group (its resources are the group's, not
        counted here), but its node runs a replica of the deployment all the same."""
        r = reservation.request
        self._held[id(reservation)] = _Held(r.group, reservation.node_id, {}, time.monotonic())

    def release(self, reservation: Reservation) -> None:
        self._held.pop(id(reservation), None)
