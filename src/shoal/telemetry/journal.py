"""The request journal: what each request leaves behind, counted and written once per batch.

Issue 14's budget: with metrics and access lines on, HTTP requests/s stays within 10% of the tree
without either. So a request does the least it can: one clock read when it ends, and one
`pending += (t0, t1, *fields)` of values it already holds (a flat list of floats, ints and
strings: nothing for the cyclic GC to follow, no tuple kept per request). The consumers read the
batch later, on the process's loop:

- every `JOURNAL_PERIOD_S` (a timer armed by the first request of a period) the batch is taken:
  the metrics fold it in (`fold(flat, width, start, secs)`: latencies with one `map`, the request counts
  per label set with a few C-level passes, see `groups` and `add_latencies`), then the access log
  renders and writes its lines (`lines.write(flat, width, secs)`), if it is on;
- a metrics snapshot taken on the loop (the push to the controller, about once a second) first
  folds what the timer has not yet (`catch_up`), so the counts it sends are exact; one taken on
  another thread sees them at most `JOURNAL_PERIOD_S` late.

Gauges that must be exact at any moment (requests in flight) stay counted per request, outside.
Entries of the last period before a process is killed are lost; `flush_all` (a clean exit) keeps them.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from itertools import compress
from operator import sub
from typing import Any, Callable, Sequence

JOURNAL_PERIOD_S = 0.2

# A fold adds a batch to the metrics: `fold(flat, width, start, secs)` reads entries `flat[start:]`,
# whose latencies in seconds are `secs`.
Fold = Callable[[list, int, int, list], None]

logger = logging.getLogger("shoal.metrics")


class Journal:
    """One process component's request entries (a proxy's, a replica's), and their consumers."""

    __slots__ = ("loop", "width", "fold", "lines", "period_s", "pending", "folded", "scheduled", "_failed",
                 "__weakref__")

    def __init__(self, loop: Any, width: int, fold: Fold, lines: Any = None,
                 period_s: float = JOURNAL_PERIOD_S) -> None:
        self.loop = loop
        self.width = width  # values per entry, (t0, t1) included
        self.fold = fold
        self.lines = lines  # an AccessLog (`write(flat, width)`), or None when access lines are off
        self.period_s = period_s
        self.pending: list = []  # the hot path: `pending += entry`, then `if not scheduled: schedule()`
        self.folded = 0  # values of `pending` already folded into the metrics (by `catch_up`)
        self.scheduled = False
        self._failed = False
        _LIVE.add(self)

    def add(self, entry: tuple) -> None:
        """For the paths that are not hot; the hot ones inline these three lines."""
        self.pending += entry
        if not self.scheduled:
            self.schedule()

    def schedule(self) -> None:
        self.scheduled = True
        self.loop.call_later(self.period_s, self.flush)

    def catch_up(self) -> None:
        """Fold the entries not yet folded: a metrics snapshot is being taken. Only on the loop's
        own thread (the hot path's): elsewhere the timer's counts, at most a period old, stand."""
        try:
            if asyncio.get_running_loop() is not self.loop:
                return
        except RuntimeError:
            return
        flat, start = self.pending, self.folded
        if len(flat) > start:
            self.folded = len(flat)
            self._fold(flat, start, latencies(flat, self.width, start))

    def flush(self) -> None:
        """Take the batch: fold what is left of it into the metrics, then write its access lines
        (both from one list of latencies)."""
        self.scheduled = False
        flat, self.pending = self.pending, []
        start, self.folded = self.folded, 0
        if not flat:
            return
        w, lines = self.width, self.lines
        secs = latencies(flat, w, 0 if lines is not None else start)
        if len(flat) > start:
            self._fold(flat, start, secs[start // w:] if lines is not None and start else secs)
        if lines is not None:
            lines.write(flat, w, secs)

    def _fold(self, flat: list, start: int, secs: list) -> None:
        try:
            self.fold(flat, self.width, start, secs)
        except Exception:  # noqa: BLE001 - metrics must never break serving
            if not self._failed:
                self._failed = True
                logger.exception("counting requests into the metrics failed")


_LIVE: "weakref.WeakSet[Journal]" = weakref.WeakSet()


def flush_all() -> None:
    """Fold and write what every journal of this process holds (before it exits)."""
    for journal in list(_LIVE):
        try:
            journal.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


# --- folding helpers: C-level passes over a batch's columns, few Python steps per batch ---------------

def latencies(flat: list, width: int, start: int) -> list:
    """Each entry's latency in seconds (t1 - t0)."""
    return list(map(sub, flat[start + 1::width], flat[start::width]))


def groups(cols: Sequence[list], secs: list) -> list:
    """`[(key, latencies)]` per distinct row of `cols` (key: a tuple, one value per column). Columns
    must compare by value cheaply (strings, ints, bools, ids). A batch is most often one key (one
    route, GET, 200): then each column's `count` of its first value proves it, at ~1 ns a value."""
    n = len(secs)
    if all(c.count(c[0]) == n for c in cols):
        return [(tuple(c[0] for c in cols), secs)]
    keys = list(zip(*cols))
    distinct = dict.fromkeys(keys)
    if len(distinct) <= 4:  # a few: one C-level selection pass each
        return [(k, list(compress(secs, map(k.__eq__, keys)))) for k in distinct]
    by: dict = {}
    for k, s in zip(keys, secs):
        g = by.get(k)
        if g is None:
            by[k] = [s]
        else:
            g.append(s)
    return list(by.items())


def add_latencies(h: list, bounds_s: Sequence[float], secs: list) -> None:
    """Count `secs` into the bucket counts `h[:len(bounds_s) + 1]` (`le` buckets, as `bisect_left`
    on the bounds). Each bound filters out what it holds, so a batch of fast requests (the case where
    the cost matters) is counted in one or two passes; the sum is left to the caller."""
    rest = secs
    for i, b in enumerate(bounds_s):
        above = list(filter(b.__lt__, rest))
        if len(above) != len(rest):
            h[i] += len(rest) - len(above)
        rest = above
        if not rest:
            return
    h[len(bounds_s)] += len(rest)



def journal_for(stats: Any, loop: Any, width: int, lines: Any = None) -> Journal:
    """A journal that feeds `stats` (a `ProxyStats` / `ReplicaStats`), which then folds it before
    each snapshot (it holds the journal weakly: the journal lives with its server)."""
    journal = Journal(loop, width, stats.fold, lines)
    stats.journal = weakref.ref(journal)
    return journal
