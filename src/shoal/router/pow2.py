"""The default replica choice: power of two choices over the router's own in-flight counts."""

from __future__ import annotations

import random
from typing import Optional, Sequence


class PowerOfTwoChoicesRequestRouter:
    """Pick two replicas at random and take the less loaded; fall back to a full scan when both are full.

    Two random probes give almost the balance of "least loaded" at constant cost, and avoid the herd
    effect of every caller choosing the same minimum.
    """

    def __init__(self, **kwargs) -> None:
        self.initialize_state(**kwargs)

    def initialize_state(self, **kwargs) -> None:
        """Hook for custom routers' `request_router_kwargs`."""

    def choose_replica(self, candidates: Sequence, request=None) -> Optional[object]:
        n = len(candidates)
        if n == 0:
            return None
        if n == 1:
            e = candidates[0]
            return e if e.has_capacity() else None
        a, b = random.sample(candidates, 2)
        if a.inflight > b.inflight:
            a, b = b, a
        if a.has_capacity():
            return a
        if b.has_capacity():
            return b
        best = None
        for e in candidates:
            if e.has_capacity() and (best is None or e.inflight < best.inflight):
                best = e
        return best
