"""Router policies used by the routing tests (importable by replicas and callers alike)."""

from shoal.router.base import RequestRouter


class LowestIdRouter(RequestRouter):
    """Always the replica with the smallest id that has room: makes routing observable."""

    def initialize_state(self, note: str = "") -> None:
        self.note = note

    def choose_replica(self, candidates, request):
        free = [c for c in candidates if c.has_capacity()]
        return min(free, key=lambda c: c.replica_id.unique_id) if free else None


def two_replicas_policy(ctx):
    """A custom autoscaling policy: always two replicas."""
    return 2, {}
