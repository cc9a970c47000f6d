"""On a cluster, power of two choices breaks ties in favour of the caller's own node."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from shoal import common
from shoal.router.pow2 import pick_two


@dataclass
class View:
    node_id: str
    queue_len: int = 0
    max_ongoing_requests: int = 10
    multiplexed_model_ids: frozenset = frozenset()

    def has_capacity(self) -> bool:
        return self.queue_len < self.max_ongoing_requests


@pytest.fixture
def on_node_a(monkeypatch):
    monkeypatch.setattr(common, "LOCAL_NODE_ID", "a")


def test_tie_goes_to_the_local_replica(on_node_a):
    local, remote = View("a"), View("b")
    assert all(pick_two([remote, local]) is local for _ in range(50))
    assert all(pick_two([local, remote]) is local for _ in range(50))


def test_less_loaded_remote_replica_still_wins(on_node_a):
    local, remote = View("a", queue_len=2), View("b", queue_len=1)
    assert all(pick_two([local, remote]) is remote for _ in range(50))


def test_without_a_node_both_are_chosen():
    x, y = View("local"), View("local")
    assert {id(pick_two([x, y])) for _ in range(200)} == {id(x), id(y)}
