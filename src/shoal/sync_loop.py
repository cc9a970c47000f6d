"""The event loop that sync callers in a driver drive themselves.

A sync `handle.remote(x).result()` through a background I/O thread costs two thread wake-ups per
call, which on a small VM is as much as the whole trip to the replica. Instead, the thread that
waits runs the loop: `remote()` takes the loop, sends, and returns; `result()` runs the loop until
its response arrives. Only one thread runs the loop at a time; others queue work for the runner
and sleep until their response is in. When nobody waits but work is still in flight (a
fire-and-forget call, or a response awaited from asyncio code), a helper thread runs the loop.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
import weakref
from typing import Any, Callable, Optional


class SyncLoop:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._router_refs: list[weakref.ref] = []
        self.closed = False
        self._lock = threading.Lock()          # held by whichever thread runs the loop
        self._cond = threading.Condition()     # non-runners sleep here
        self._waiters = 0
        self._runner_waiting = False           # the runner is inside wait(): stop the loop on wake()
        self._helper_event = threading.Event()
        # Written by call_soon_threadsafe, so a runner blocked on one socket notices queued work.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._kicked = False        # a response is awaited from another event loop: run until none is in flight
        self._queued_calls = False  # work handed over with call_soon_threadsafe, not yet run
        self._helper = threading.Thread(target=self._helper_main, name="shoal-sync-helper", daemon=True)
        self._helper.start()

    # --- entry points for sync callers ---------------------------------------------------------
    def submit(self, fn: Callable, *args: Any) -> None:
        """Run `fn(*args)` on the loop now (sending its writes), or hand it to the current runner."""
        if asyncio._get_running_loop() is None and self._lock.acquire(blocking=False):
            try:
                if not self._queued_calls:
                    fn(*args)  # nothing else is due: no need to spin the loop (its writes go out at once)
                else:
                    loop = self.loop

                    def step() -> None:
                        fn(*args)  # its connections write at once (`Connection.immediate`)
                        loop.stop()

                    self._queued_calls = False
                    loop.call_soon(step)
                    loop.run_forever()  # one iteration: callbacks queued earlier (replica sets), then `fn`
            finally:
                self._release()
        else:
            # Another thread runs the loop (or this thread runs another loop): queue it for the runner.
            self.call_soon_threadsafe(fn, *args)

    def call_soon_threadsafe(self, fn: Callable, *args: Any) -> None:
        """Queue `fn` for whoever runs the loop next (a helper runs it if nobody waits)."""
        self._queued_calls = True
        self.loop.call_soon_threadsafe(fn, *args)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway
        if not self._lock.locked():
            self._helper_event.set()

    def wait(self, done: Callable[[], bool], timeout: Optional[float] = None, conn: Any = None) -> bool:
        """Block until `done()`; run the loop meanwhile if no other thread does. False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self._lock.acquire(blocking=False):
                try:
                    if conn is None or not self._read_directly(conn, done, deadline):
                        self._run_until(done, deadline)
                finally:
                    self._release()
            else:
                with self._cond:
                    self._waiters += 1
                    try:
                        if not done() and self._lock.locked():
                            self._cond.wait(0.1 if remaining is None else min(remaining, 0.1))
                    finally:
                        self._waiters -= 1
        return True

    def wake(self) -> None:
        """Called on the loop when something a waiter may wait for happened."""
        if self._runner_waiting:
            self.loop.stop()
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def kick(self) -> None:
        """Make sure someone runs the loop (a response is awaited from another event loop)."""
        self._kicked = True
        self._helper_event.set()

    # --- internals -----------------------------------------------------------------------------
    def _read_directly(self, conn: Any, done: Callable[[], bool], deadline: Optional[float]) -> bool:
        """Fast path: block on the one socket the awaited reply comes on, feeding it to its connection.

        Skips the event loop's machinery while nothing else is due. Returns False to hand over to the
        loop: when other work was queued, the peer closed, or the socket is not ours to read.
        """
        sock = conn.sock
        if sock is None or conn.closed or self._queued_calls:
            return False
        poller = conn.__dict__.get("_sync_poller")
        if poller is None:
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            conn._sync_poller = poller
        wake_r = self._wake_r
        while not done():
            ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = poller.poll(ms)
            if not events:
                return True  # timed out: the caller sees done() is false
            for fd, _ in events:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    return False  # queued work: let the loop run it
            try:
                n = sock.recv_into(conn.get_buffer(-1))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return False
            if n == 0:
                return False  # the peer closed: the loop reports it
            conn.buffer_updated(n)
        return True

    def _run_until(self, done: Callable[[], bool], deadline: Optional[float]) -> None:
        loop = self.loop
        self._runner_waiting = True
        self._queued_calls = False
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        try:
            while not done():
                timer = None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    timer = loop.call_later(remaining, loop.stop)
                loop.run_forever()
                if timer is not None:
                    timer.cancel()
        finally:
            self._runner_waiting = False

    def _release(self, from_helper: bool = False) -> None:
        self._lock.release()
        if self._waiters:
            with self._cond:
                self._cond.notify_all()
        if not from_helper and not self.closed and self._busy():
            self._helper_event.set()

    def add_router(self, router: Any) -> None:
        self._router_refs = [r for r in self._router_refs if r() is not None] + [weakref.ref(router)]

    def routers(self) -> list:
        return [r for r in (ref() for ref in self._router_refs) if r is not None]

    def _busy(self) -> bool:
        """Whether the loop must run with no caller waiting: unsent requests, or a kicked await."""
        if self._queued_calls:
            return True
        for ref in self._router_refs:
            r = ref()
            if r is not None and (r.pending or r._background):
                return True
        if self._kicked:
            self._kicked = any(r.in_flight() for r in self.routers())
        return self._kicked

    def _helper_main(self) -> None:
        while True:
            self._helper_event.wait()
            self._helper_event.clear()
            time.sleep(0.002)  # grace: a caller about to call `.result()` drives the loop itself
            while not self.closed and self._busy():
                if not self._lock.acquire(blocking=False):
                    time.sleep(0.005)  # a caller runs the loop; look again later
                    continue
                try:
                    if self._waiters == 0 and self._busy():
                        # Run a while, then re-check whether work remains or a caller wants the loop.
                        self._runner_waiting = True
                        self._queued_calls = False
                        timer = self.loop.call_later(0.02, self.loop.stop)
                        self.loop.run_forever()
                        timer.cancel()
                finally:
                    self._runner_waiting = False
                    self._release(from_helper=True)
            if self.closed:
                return

    def close(self) -> None:
        """Close every router on this loop and stop the helper."""
        for r in self.routers():
            self.submit(r.close)
        self.closed = True
        self._helper_event.set()
