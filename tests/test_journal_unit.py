"""The request journal (telemetry/journal.py): a batch folded per period counts exactly what one
`bisect` per request counted, a snapshot on the loop sees every request, nothing is counted twice,
and the access lines come from the same entries. In-process, no timing: the timer is never awaited
where a test asserts that it has not fired."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import time
from bisect import bisect_left

from shoal.access_log import (
    PROXY_ENTRY_WIDTH,
    REPLICA_ENTRY_WIDTH,
    AccessLog,
    asctimes,
    proxy_render,
    replica_render,
)
from shoal.http.routes import Route
from shoal.telemetry.journal import add_latencies, groups, journal_for
from shoal.telemetry.registry import REGISTRY
from shoal.telemetry.serve_metrics import (
    HTTP_LATENCY,
    HTTP_REQUESTS,
    REPLICA_ERRORS,
    REPLICA_REQUESTS,
    REQUEST_LATENCY_BOUNDS_S,
    ProxyStats,
    ReplicaStats,
)


def test_add_latencies_counts_as_bisect_per_value():
    rng = random.Random(7)
    values = [rng.choice([0.0, 0.001, 0.02, 700.0]) for _ in range(50)]
    values += [10 ** rng.uniform(-5, 3) for _ in range(2000)]
    h = [0] * (len(REQUEST_LATENCY_BOUNDS_S) + 1)
    add_latencies(h, REQUEST_LATENCY_BOUNDS_S, list(values))
    want = [0] * len(h)
    for v in values:
        want[bisect_left(REQUEST_LATENCY_BOUNDS_S, v)] += 1
    assert h == want


def test_groups_match_a_dict_of_lists():
    rng = random.Random(3)
    for n_keys in (1, 3, 20):
        statuses = [rng.randrange(n_keys) for _ in range(500)]
        methods = ["GET"] * 500
        secs = [rng.random() for _ in range(500)]
        want: dict = {}
        for m, s, x in zip(methods, statuses, secs):
            want.setdefault((m, s), []).append(x)
        got = {k: sorted(v) for k, v in groups([methods, statuses], secs)}
        assert got == {k: sorted(v) for k, v in want.items()}


def _samples(snap: dict, name: str) -> dict:
    family = snap.get(name)
    return {} if family is None else family[4]


def _proxy_requests(snap: dict) -> dict:
    return _samples(snap, HTTP_REQUESTS)


def test_proxy_snapshot_on_the_loop_sees_every_request_once():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        stats = ProxyStats(lambda: 0)
        journal = journal_for(stats, loop, PROXY_ENTRY_WIDTH)
        a, b = Route("/a", "app_a", "A"), Route("/b", "app_b", "B")
        before = _proxy_requests(REGISTRY.snapshot())  # other tests' proxies may have left counts (404s)
        t = 100.0
        for i in range(30):
            journal.add((t, t + 0.0004, a if i % 3 else b, "GET", 200 if i % 5 else 500, f"id{i}"))
        journal.add((t, t + 0.003, Route("", "", ""), "GET", 404, None))
        # the timer (0.2 s) has not run: the snapshot folds what is pending
        after = _proxy_requests(REGISTRY.snapshot())
        assert {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)} == {
            ("/a", "GET", "app_a", "200"): 16.0, ("/a", "GET", "app_a", "500"): 4.0,
            ("/b", "GET", "app_b", "200"): 8.0, ("/b", "GET", "app_b", "500"): 2.0, ("", "GET", "", "404"): 1.0}
        journal.add((t, t + 0.0004, a, "GET", 200, "late"))
        journal.flush()  # folds only what the snapshot had not
        snap = REGISTRY.snapshot()
        assert _proxy_requests(snap)[("/a", "GET", "app_a", "200")] == 17.0
        hist = _samples(snap, HTTP_LATENCY)[("/a", "GET", "app_a", "200")]
        assert hist[0] == 17 and sum(hist[:-1]) == 17 and abs(hist[-1] - 17 * 0.4) < 1e-6
        del stats, journal

    asyncio.run(main())


def test_snapshot_off_the_loop_leaves_the_batch_to_the_timer():
    loop = asyncio.new_event_loop()
    try:
        stats = ReplicaStats("D", "r_off_loop", "app", lambda: 0)
        journal = journal_for(stats, loop, REPLICA_ENTRY_WIDTH)
        journal.add((1.0, 1.002, "/", False, "x", "GET", "/", 200))
        snap = REGISTRY.snapshot()  # not on `loop`: the hot path may be extending the batch
        assert ("D", "r_off_loop", "app", "/") not in _samples(snap, REPLICA_REQUESTS)
        journal.add((1.0, 1.5, "", True, "y", "CALL", "hello", "ERROR"))
        journal.flush()
        snap = REGISTRY.snapshot()
        assert snap[REPLICA_REQUESTS][4][("D", "r_off_loop", "app", "/")] == 1.0
        assert snap[REPLICA_ERRORS][4][("D", "r_off_loop", "app", "")] == 1.0
        del stats, journal
    finally:
        loop.close()


def test_access_lines_from_the_journal():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    # setLevel, not an attribute patch: it also clears the loggers' isEnabledFor caches, which an
    # earlier test in the same process may have filled at WARNING.
    old_level = root.level
    root.setLevel(logging.INFO)
    loop = asyncio.new_event_loop()
    try:
        route = Route("/r", "app", "Ingress")
        proxy = journal_for(ProxyStats(lambda: 0), loop, PROXY_ENTRY_WIDTH,
                            AccessLog(proxy_render("TEXT", "proxy_0")))
        proxy.add((5.0, 5.0123, route, "POST", 201, "rid-1"))
        proxy.add((5.0, 5.25, Route("/s", "app2", "Other"), "GET", 200, "rid-2"))
        proxy.add((5.0, 5.001, route, "GET", 413, None))  # counted, no line
        proxy.flush()
        replica = journal_for(ReplicaStats("D", "r_lines", "app", lambda: 0), loop, REPLICA_ENTRY_WIDTH,
                              AccessLog(replica_render("TEXT", "app", "D", "r_lines", "1")))
        replica.add((5.0, 5.0004, "", True, "rid-3", "CALL", "hello", "ERROR"))
        replica.flush()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        loop.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("INFO ") and lines[0].endswith(
        " shoal.access app#Ingress proxy_0 rid-1 -- POST /r 201 12.3ms")
    assert lines[1].endswith(" shoal.access app2#Other proxy_0 rid-2 -- GET /s 200 250.0ms")
    assert lines[2].endswith(" shoal.access app#D r_lines rid-3 -- CALL hello ERROR 0.4ms")


def _asctime(wall: float) -> str:
    """logging's default `asctime` of a wall time."""
    ms = int(wall * 1000.0)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms // 1000)) + f",{ms % 1000:03d}"


def test_asctimes_of_ordered_times_match_each_line_formatted_alone():
    offset = 1_765_000_000.0  # wall clock minus perf_counter, as a live process has it
    rng = random.Random(11)
    for lines, span_ms in ((1, 1), (50, 3), (400, 40), (30, 2000)):
        # each time in the middle of its millisecond: away from the rounding at its edges
        millis = sorted(rng.randrange(span_ms) for _ in range(lines))
        t1s = [(5_000_000 + m + 0.5) / 1000.0 - offset for m in millis]
        want = [_asctime(t1 + offset) for t1 in t1s]
        assert asctimes(t1s, offset, "<", ">") == [f"<{w}>" for w in want]
        assert asctimes(list(reversed(t1s)), offset) == list(reversed(want))  # not in order: line by line
