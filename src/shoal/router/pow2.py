"""The default replica choice: power of two choices over this caller's in-flight counts.

Two random probes give almost the balance of "least loaded" at constant cost, and avoid the herd
effect of every caller choosing the same minimum. On a cluster, a tie goes to the replica on the
caller's own node.

Multiplexed requests (as in Ray Serve), tier by tier, power of two choices within a tier:
1. the replicas that hold (or are loading) the request's model;
2. when none does, or all of them are full: the replicas holding the fewest models, so a busy
   model spills onto an idle replica at once instead of queueing behind its holders;
3. when those are full too and the request has waited `MODEL_MATCH_WINDOW_S` in the queue: any
   replica with room (the router re-runs its queue when that window ends).
"""

from __future__ import annotations

import random

_randrange = random.randrange
from typing import Any, Optional, Sequence

from shoal import common as _common
from shoal.router.base import ReplicaView, RequestRouter

# How long a multiplexed request waits for a replica that holds its model, or holds the fewest models,
# before taking any replica with room (Ray Serve's RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S).
MODEL_MATCH_WINDOW_S = 1.0


def pick_two(candidates: Sequence[ReplicaView]) -> Optional[ReplicaView]:
    """The less loaded of two random replicas with room; a full scan when both are full."""
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        e = candidates[0]
        return e if e.has_capacity() else None
    i = _randrange(n)
    j = _randrange(n - 1)
    a, b = candidates[i], candidates[j + 1 if j >= i else j]  # two distinct replicas, cheaper than sample()
    if a.queue_len > b.queue_len or (a.queue_len == b.queue_len and b.node_id != a.node_id
                                     and b.node_id == _common.LOCAL_NODE_ID):
        a, b = b, a  # the less loaded first; on a tie, the one on this node (no network hop)
    if a.has_capacity():
        return a
    if b.has_capacity():
        return b
    best = None
    for e in candidates:
        if e.has_capacity() and (best is None or e.queue_len < best.queue_len):
            best = e
    return best


def pick_for_model(candidates: Sequence[ReplicaView], model: str, request: Any) -> Optional[ReplicaView]:
    """The replica for a request of multiplexed model `model` (the tiers are in the module's docstring)."""
    if not candidates:
        return None
    holders = [c for c in candidates if model in c.multiplexed_model_ids]
    if holders:
        chosen = pick_two(holders)
        if chosen is not None:
            return chosen
    fewest = min(len(c.multiplexed_model_ids) for c in candidates)
    chosen = pick_two([c for c in candidates if len(c.multiplexed_model_ids) == fewest])
    if chosen is not None or getattr(request, "queued_for_s", 0.0) < MODEL_MATCH_WINDOW_S:
        return chosen
    return pick_two(candidates)


class PowerOfTwoChoicesRequestRouter(RequestRouter):
    def choose_replica(self, candidates: Sequence[ReplicaView], request: Any) -> Optional[ReplicaView]:
        model = getattr(request, "multiplexed_model_id", "")
        if not model:
            return pick_two(candidates)
        return pick_for_model(candidates, model, request)
