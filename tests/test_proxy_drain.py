"""A proxy that drains (http/drain.py) and hands its listener to a peer (http/listener_handover.py).

Real proxy processes (`tests/drain_harness.py`: shoal's ProxyApp on the proxy's uvicorn server, a stub
in place of the replica), real sockets, real HTTP. No assertion depends on how fast anything is.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import queue
import socket
import subprocess
import sys
import threading
import types

import pytest

from shoal.http import drain
from shoal.http.listener_handover import HandoverReceiver, ListenerSet, hand_over, handover_dir, instance_key

from conftest import wait_for

HARNESS = os.path.join(os.path.dirname(__file__), "drain_harness.py")
DRAINING = b"This node is being drained."


class Harness:
    """One proxy process; its stdout lines arrive on a queue."""

    def __init__(self, port: int, root: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, HARNESS, str(port), root], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        ready = self.expect("READY").split()
        self.port, self.pid = int(ready[1]), ready[2]

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = 120.0) -> str:
        """The next stdout line starting with `prefix` (other lines are kept in `seen`)."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} line from the harness; it printed {self.seen[-20:]}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture
def harnesses(tmp_path):
    started: list[Harness] = []

    def start(port: int = 0) -> Harness:
        h = Harness(port, str(tmp_path))
        started.append(h)
        return h

    yield start
    for h in started:
        h.stop()


def _get(port: int, path: str, conn: http.client.HTTPConnection = None) -> tuple:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read(), r.getheader("connection")
    finally:
        if conn is None:
            c.close()


# --- the proxy while it drains ----------------------------------------------------------------------
def test_a_draining_proxy_answers_health_checks_with_503_and_closes_connections(harnesses):
    proxy = harnesses()
    assert _get(proxy.port, "/-/healthz")[:2] == (200, b"success")
    keep_alive = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
    assert _get(proxy.port, "/", keep_alive) == (200, proxy.pid.encode(), None)  # kept open
    held = _in_thread(lambda: _get(proxy.port, "/hold"))
    proxy.expect("HELD")

    proxy.send("drain 30 600 1")  # alone on its port: it keeps serving for the minimum period
    wait_for(lambda: _get(proxy.port, "/-/healthz")[0] == 503, what="the health check to answer 503")
    assert _get(proxy.port, "/-/healthz") == (503, DRAINING, "close")
    assert _get(proxy.port, "/-/routes") == (503, DRAINING, "close")
    # Requests are still served, each on a connection that then closes: keep-alive clients move off.
    assert _get(proxy.port, "/", keep_alive) == (200, proxy.pid.encode(), "close")
    assert _get(proxy.port, "/") == (200, proxy.pid.encode(), "close")
    # The request in flight when the drain began finishes, and its connection closes too.
    proxy.send("release")
    assert held.result() == (200, b"released", "close")
    assert proxy.proc.poll() is None  # the minimum draining period is not over


def test_an_idle_proxy_ends_after_its_request_in_flight_finishes(harnesses):
    proxy = harnesses()
    held = _in_thread(lambda: _get(proxy.port, "/hold"))
    proxy.expect("HELD")
    proxy.send("drain 30 0 1")  # no minimum period, no peer: it ends once the request is answered
    proxy.expect("DRAINED")
    assert proxy.proc.poll() is None
    proxy.send("release")
    assert held.result() == (200, b"released", "close")
    proxy.expect("EXIT")
    assert proxy.proc.wait(60) == 0


def _drain_to_a_peer(proxy) -> None:
    """Drain `proxy` (30 s minimum period, 600 s timeout, handover on); it hands its listeners to a
    peer and exits."""
    proxy.send("drain 30 600 1")
    assert "went to the proxy at" in proxy.expect("DRAINED")
    proxy.expect("EXIT")


@pytest.mark.slow
def test_a_proxy_that_hands_its_listener_over_loses_no_connection_under_load(harnesses):
    """Two proxies share a port (SO_REUSEPORT); one drains under a steady load of new connections and
    keep-alive clients. It hands its listening socket to the other, so no connection is reset, and it
    ends once its clients moved off, long before the minimum draining period."""
    leaving = harnesses()
    staying = harnesses(leaving.port)
    with _load(leaving.port, new_connection_threads=4, keep_alive_threads=2) as load:
        wait_for(lambda: {leaving.pid, staying.pid} <= set(load.served_by), timeout=120,
                 what="both proxies serving")
        _drain_to_a_peer(leaving)
        after = load.count()
        wait_for(lambda: load.count() >= after + 300, timeout=120, what="300 more requests")
    assert load.failures == [], load.failures[:5]
    assert leaving.proc.wait(60) == 0
    assert load.served_by[staying.pid] > 0 and load.count() >= after + 300


@pytest.mark.slow
def test_a_proxy_passes_on_the_listeners_it_was_handed_when_it_drains_too(harnesses):
    """Three proxies on one port; two drain one after the other under load: the last one holds all
    three listening sockets, and no request fails."""
    first = harnesses()
    second, last = harnesses(first.port), harnesses(first.port)
    with _load(first.port, new_connection_threads=4, keep_alive_threads=2) as load:
        wait_for(lambda: {first.pid, second.pid, last.pid} <= set(load.served_by), timeout=120,
                 what="the three proxies serving")
        for leaving in (first, second):
            _drain_to_a_peer(leaving)
        after = load.count()
        wait_for(lambda: load.count() >= after + 300, timeout=120, what="300 more requests")
    assert load.failures == [], load.failures[:5]
    assert _listening_sockets(int(last.pid), first.port) == 3


# --- the modules, in this process ---------------------------------------------------------------
def test_closing_send_adds_connection_close_to_the_response_head_only():
    sent: list = []

    async def send(message):
        sent.append(message)

    start = {"type": "http.response.start", "status": 200, "headers": [(b"a", b"b")]}
    body = {"type": "http.response.body", "body": b"x"}
    asyncio.run(_send_all(drain.closing(send), [start, body]))
    assert sent[0]["headers"] == [(b"a", b"b"), (b"connection", b"close")]
    assert start["headers"] == [(b"a", b"b")]  # the caller's message is not changed
    assert sent[1] is body


async def _send_all(send, messages):
    for m in messages:
        await send(m)


def test_refuse_keep_alive_marks_only_requests_in_progress():
    running = types.SimpleNamespace(cycle=types.SimpleNamespace(response_complete=False, keep_alive=True))
    done = types.SimpleNamespace(cycle=types.SimpleNamespace(response_complete=True, keep_alive=True))
    idle = types.SimpleNamespace(cycle=None)
    websocket = object()
    assert drain.refuse_keep_alive([running, done, idle, websocket]) == 1
    assert running.cycle.keep_alive is False and done.cycle.keep_alive is True


def test_min_draining_period_from_the_environment(monkeypatch):
    monkeypatch.delenv(drain.MIN_DRAINING_PERIOD_ENV, raising=False)
    assert drain.min_draining_period_s() == 30.0  # Ray's PROXY_MIN_DRAINING_PERIOD_S
    monkeypatch.setenv(drain.MIN_DRAINING_PERIOD_ENV, "2.5")
    assert drain.min_draining_period_s() == 2.5
    for bad in ("-1", "soon", "nan"):  # logged; the default is used, so a drain still happens
        monkeypatch.setenv(drain.MIN_DRAINING_PERIOD_ENV, bad)
        assert drain.min_draining_period_s() == 30.0


def test_a_receiver_refuses_a_listener_of_another_port_and_the_sender_keeps_it(tmp_path):
    async def scenario():
        mine, other = _listener(0), _listener(0)
        fake_server = types.SimpleNamespace(servers=[], config=None)
        directory = handover_dir(1234, "", str(tmp_path))
        receiver = HandoverReceiver(ListenerSet(fake_server, [mine]), directory)
        receiver.start()
        leaving = ListenerSet(types.SimpleNamespace(servers=[]), [other])
        took = await hand_over(leaving, directory, timeout_s=10)
        receiver.close()
        return took, other, mine

    took, other, mine = asyncio.run(scenario())
    assert took is None
    assert other.fileno() != -1 and other.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)  # still ours
    assert os.listdir(os.path.join(str(tmp_path), "listeners", "1234")) == []  # the receiver cleaned up
    other.close()
    mine.close()


def test_proxies_of_one_instance_share_a_handover_directory_and_other_instances_do_not(tmp_path):
    a, b = instance_key(b"secret-a", "tcp://x"), instance_key(b"secret-b", "tcp://x")
    assert a == instance_key(b"secret-a", "tcp://y") and a != b
    assert instance_key(None, "/tmp/shoal-1/s1/") == "s1"
    assert handover_dir(8000, a, str(tmp_path)) != handover_dir(8000, b, str(tmp_path))
    assert oct(os.stat(handover_dir(8000, a, str(tmp_path))).st_mode & 0o777) == "0o700"


def test_a_sweep_removes_what_killed_proxies_left_and_keeps_live_receivers(tmp_path):
    from shoal.http.listener_handover import sweep

    live_dir, dead_dir = handover_dir(1, "live", str(tmp_path)), handover_dir(2, "dead", str(tmp_path))
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(os.path.join(live_dir, "1-live.sock"))
    live.listen(4)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(os.path.join(dead_dir, "2-dead.sock"))
    dead.close()  # the file stays, nobody listens
    sweep(os.path.join(str(tmp_path), "listeners"), min_age_s=0)
    assert os.listdir(live_dir) == ["1-live.sock"] and not os.path.exists(dead_dir)
    live.close()


def test_hand_over_skips_receivers_whose_process_is_gone(tmp_path):
    directory = handover_dir(1234, "", str(tmp_path))
    stale = os.path.join(directory, "1-dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # the file stays, nobody listens: what a killed proxy leaves
    sock = _listener(0)
    took = asyncio.run(hand_over(ListenerSet(types.SimpleNamespace(servers=[]), [sock]), directory))
    assert took is None and not os.path.exists(stale)
    sock.close()


def test_the_controller_drains_a_proxy_with_the_minimum_period_and_shows_it_draining_until_it_exits(monkeypatch):
    from shoal.controller.proxy_state import DRAIN_TIMEOUT_S, ProxyManager, ProxyRecord
    from shoal.status import ProxyStatus

    monkeypatch.setenv(drain.MIN_DRAINING_PERIOD_ENV, "7")
    calls: list = []

    class Process:
        node_id, code = "n1", None

        def exit_code(self):
            return self.code

    class Conn:
        def call(self, *args):
            calls.append(args)

    controller = types.SimpleNamespace(runtime=types.SimpleNamespace(name="ray"), spawn=lambda call: None,
                                       status_changed=lambda: None, shutting_down=False)
    manager = ProxyManager(controller)
    serving, leaving = (ProxyRecord(i, Process(), Conn(), ProxyStatus.HEALTHY, 8000) for i in (0, 1))
    serving.process.node_id = "n0"
    manager.proxies = {0: serving, 1: leaving}
    manager._retire(1)
    assert calls == [("drain", DRAIN_TIMEOUT_S, 7.0, True)]
    assert manager.statuses() == {"n0:0": ProxyStatus.HEALTHY, "n1:1": ProxyStatus.DRAINING}
    leaving.process.code = 0
    manager._reap_retiring()
    assert manager.statuses() == {"n0:0": ProxyStatus.HEALTHY}


def test_a_proxy_draining_through_a_controller_restart_gets_the_routes_but_no_record():
    from shoal.controller.proxy_state import ProxyManager, ProxyRecord
    from shoal.status import ProxyStatus

    runtime = types.SimpleNamespace(name="ray", proxy_count_may_grow=lambda options: True)
    controller = types.SimpleNamespace(runtime=runtime, spawn=lambda call: None, status_changed=lambda: None,
                                       shutting_down=False)
    manager = ProxyManager(controller)
    manager.options = {}
    new = ProxyRecord(1, None, None, ProxyStatus.STARTING)
    manager.proxies = {1: new}  # index 1 went to a new proxy while the old one drained
    old_conn = types.SimpleNamespace()
    reply = manager.hello(old_conn, 1, serving_port=8000, draining=True)
    assert "routes" in reply and new.conn is None and new.status == ProxyStatus.STARTING
    assert getattr(old_conn, "proxy", None) is None


# --- helpers ------------------------------------------------------------------------------------
def _listening_sockets(pid: int, port: int) -> int:
    """How many listening TCP sockets on `port` process `pid` holds (from /proc)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    listening.add(fields[9])  # the socket's inode
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        held += target.startswith("socket:[") and target[8:-1] in listening
    return held


def _listener(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    return s


class _Result:
    def __init__(self, fn):
        self._box: list = []
        self._thread = threading.Thread(target=lambda: self._box.append(_call(fn)), daemon=True)
        self._thread.start()

    def result(self, timeout: float = 60):
        self._thread.join(timeout)
        assert self._box, "the request did not finish"
        ok, value = self._box[0]
        if not ok:
            raise value
        return value


def _call(fn):
    try:
        return True, fn()
    except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
        return False, e


def _in_thread(fn) -> _Result:
    return _Result(fn)


class _Load:
    """Threads making requests one after another; each failure (an exception, a status other than 200)
    is recorded; `served_by` counts answers per proxy (`who(response, body)`: by default the body, the
    harness's pid)."""

    def __init__(self, port: int, new_connection_threads: int, keep_alive_threads: int, path: str = "/",
                 who=None):
        self.port = port
        self.path = path
        self.who = who or (lambda response, body: body)
        self.stop = threading.Event()
        self.failures: list = []
        self.served_by: dict[str, int] = {}
        self.last = ""  # who answered the latest request
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(False,), daemon=True)
                        for _ in range(new_connection_threads)]
        self.threads += [threading.Thread(target=self._run, args=(True,), daemon=True)
                         for _ in range(keep_alive_threads)]

    def count(self) -> int:
        with self._lock:
            return sum(self.served_by.values())

    def _run(self, keep_alive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60) if keep_alive else None
        while not self.stop.is_set():
            try:
                c = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                c.request("GET", self.path, headers={} if keep_alive else {"Connection": "close"})
                r = c.getresponse()
                body = r.read().decode()
                if conn is None:
                    c.close()
                if r.status != 200:
                    self.failures.append(f"status {r.status}: {body[:100]}")
                    continue
                key = self.who(r, body)
                with self._lock:
                    self.served_by[key] = self.served_by.get(key, 0) + 1
                    self.last = key
            except Exception as e:  # noqa: BLE001 - counted: the test asserts there are none
                self.failures.append(repr(e))
                if conn is not None:
                    conn.close()

    def __enter__(self) -> "_Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def _load(port: int, new_connection_threads: int, keep_alive_threads: int, path: str = "/", who=None) -> _Load:
    return _Load(port, new_connection_threads, keep_alive_threads, path, who)
