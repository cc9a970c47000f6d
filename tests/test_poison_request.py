"""A poison request kills at most one replica; requests that never reached a dead replica are served.

Real replica processes: a request that kills its replica fails with `ReplicaDiedError` naming it and
is never re-sent. The last test drives the router against in-process fake replicas to pin down the
one case where unanswered requests are re-sent: a replica that announced draining never ran them.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import psutil
import pytest

from shoal import serve
from shoal.api import get_http_url
from shoal.common import DeploymentID, DeploymentTargets, ReplicaID, RunningReplicaInfo
from shoal.router.router import Router
from shoal.transport.connection import serve_unix

from conftest import wait_for


def _record_replica(directory: str) -> None:
    """Called in a replica's constructor: a file named by its pid, holding its replica id."""
    pid = os.getpid()
    tmp = os.path.join(directory, f".{pid}")
    with open(tmp, "w") as f:
        f.write(serve.get_replica_context().replica_id.unique_id)
    os.rename(tmp, os.path.join(directory, str(pid)))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _live_replicas(directory: str) -> dict[int, str]:
    """pid -> replica id of every replica process of the deployment still alive."""
    out = {}
    for name in os.listdir(directory):
        if not name.startswith(".") and _alive(int(name)):
            with open(os.path.join(directory, name)) as f:
                out[int(name)] = f.read()
    return out


def _running(app: str, dep: str) -> int:
    d = serve.status().applications[app].deployments[dep]
    return d.replica_states.get(serve.ReplicaState.RUNNING, 0)


def _wait_for_replicas(directory: str, app: str, dep: str, n: int) -> dict[int, str]:
    wait_for(lambda: _running(app, dep) == n and len(_live_replicas(directory)) == n, timeout=60,
             what=f"{n} running replicas")
    return _live_replicas(directory)


@serve.deployment(num_replicas=3)
class Victim:
    def __init__(self, directory):
        _record_replica(directory)

    def pid(self):
        return os.getpid()

    def die_sync(self):  # in the replica's thread pool
        os.kill(os.getpid(), signal.SIGKILL)

    async def die_async(self):  # before its first await
        os._exit(1)

    async def __call__(self, request):
        if request.query_params.get("die"):
            os._exit(1)
        return os.getpid()


def _assert_one_died(before: dict[int, str], err: BaseException, d: str, app: str) -> None:
    # The caller may see the connection close while the process is still exiting.
    wait_for(lambda: any(not _alive(pid) for pid in before), what="the poisoned replica to exit")
    # Once the deployment is back at three replicas, exactly one of the first three is gone.
    after = _wait_for_replicas(d, app, "Victim", 3)
    dead = [pid for pid in before if not _alive(pid)]
    assert len(dead) == 1, f"{len(dead)} of 3 replicas died"
    assert set(before) - set(after) == set(dead)
    if err is not None:
        assert before[dead[0]] in str(err), str(err)


@pytest.mark.parametrize("method", ["die_sync", "die_async"])
def test_poison_request_kills_one_replica_of_three(serve_app, tmp_path, method):
    d = str(tmp_path)
    h = serve.run(Victim.bind(d), name="poison", route_prefix=None)
    before = _wait_for_replicas(d, "poison", "Victim", 3)

    with pytest.raises(serve.ReplicaDiedError, match="died while handling request") as info:
        getattr(h, method).remote().result(timeout_s=60)
    _assert_one_died(before, info.value, d, "poison")
    pids = {h.pid.remote().result(timeout_s=30) for _ in range(10)}
    assert all(_alive(p) for p in pids)


def test_poison_http_request_is_500_and_kills_one_replica(serve_app, tmp_path):
    d = str(tmp_path)
    serve.run(Victim.bind(d), name="poison", route_prefix="/poison")
    before = _wait_for_replicas(d, "poison", "Victim", 3)
    url = get_http_url() + "/poison"

    r = httpx.get(url, params={"die": "1"}, timeout=60)
    assert r.status_code == 500
    assert r.text == "Internal Server Error"
    _assert_one_died(before, None, d, "poison")
    r = httpx.get(url, timeout=60)
    assert r.status_code == 200 and _alive(int(r.text))


@serve.deployment(num_replicas=2, max_ongoing_requests=1)
class Busy:
    def __init__(self, directory):
        _record_replica(directory)

    async def hold(self, flag: str, die: bool):
        open(f"{flag}.{os.getpid()}", "w").close()  # it runs here
        while not os.path.exists(flag):
            await asyncio.sleep(0.01)
        if die:
            os._exit(1)
        return os.getpid()

    def pid(self):
        return os.getpid()


def test_requests_queued_in_the_caller_are_served_by_another_replica(serve_app, tmp_path):
    d = str(tmp_path / "pids")
    os.mkdir(d)
    h = serve.run(Busy.bind(d), name="busy", route_prefix=None)
    before = _wait_for_replicas(d, "busy", "Busy", 2)
    die_flag, live_flag = str(tmp_path / "die"), str(tmp_path / "live")

    async def scenario():
        # One request holds each replica (max_ongoing_requests=1), so the next ones queue here.
        doomed = h.hold.remote(die_flag, True)
        held = h.hold.remote(live_flag, False)
        queued = [h.pid.remote() for _ in range(5)]
        while not any(n.startswith("die.") for n in os.listdir(tmp_path)):
            await asyncio.sleep(0.01)
        victim = int(next(n for n in os.listdir(tmp_path) if n.startswith("die.")).split(".")[1])
        open(die_flag, "w").close()  # the replica running `doomed` dies
        with pytest.raises(serve.ReplicaDiedError, match=before[victim]):
            await doomed
        open(live_flag, "w").close()
        return victim, await held, await asyncio.gather(*queued)

    victim, survivor, served = asyncio.run(scenario())
    assert survivor != victim
    assert victim not in served and len(served) == 5
    assert set(before) - set(_wait_for_replicas(d, "busy", "Busy", 2)) == {victim}


# --- the router against fake replicas: which unanswered requests a lost connection re-sends ----------
class _FakeReplica:
    """The replica side of a data connection: records the requests it reads, answers none."""

    def __init__(self):
        self.conn = None
        self.got: list[bytes] = []

    def on_connection_made(self, conn):
        self.conn = conn

    def on_request(self, conn, rid, body):
        self.got.append(body)

    def on_cancel(self, conn, rid):
        pass

    def on_notify(self, conn, topic, payload):
        pass

    def on_connection_lost(self, conn, exc):
        pass


class _Resp:
    """What a router needs of a request (a `DeploymentResponse` without a handle), already serialized."""

    args: tuple = ()
    kwargs: dict = {}
    multiplexed_model_id = ""
    session_id = ""
    stream = False
    method_name = "m"

    def __init__(self, name: str):
        self.payload = name.encode()
        self.request_id = name
        self._cancelled = False
        self._call = None
        self._queued_at = 0.0
        self.outcome = None

    def _complete(self, value=None, exc=None):
        self.outcome = exc if exc is not None else value


@pytest.mark.parametrize("announced", [True, False])
def test_a_lost_connection_re_sends_only_what_a_draining_replica_never_accepted(tmp_path, announced):
    async def until(condition):
        while not condition():
            await asyncio.sleep(0.001)

    async def scenario():
        loop = asyncio.get_running_loop()
        dep = DeploymentID("D", "app")
        fakes, infos = {}, {}
        for uid in ("a", "b"):
            fakes[uid] = _FakeReplica()
            path = str(tmp_path / f"{uid}.sock")
            await serve_unix(path, lambda f=fakes[uid]: f)
            infos[uid] = RunningReplicaInfo(ReplicaID(uid, dep), path, 10)
        router = Router(dep, loop)
        router.update(DeploymentTargets(dep, [infos["a"]]))
        await until(lambda: router.ready)
        a = router.ready[0]

        accepted, unread, later = _Resp("accepted"), _Resp("unread"), _Resp("later")
        router.assign(accepted)
        await until(lambda: fakes["a"].got == [b"accepted"])
        if announced:  # it starts draining with `accepted` running: the highest id it accepted
            fakes["a"].conn.notify("draining", accepted._call.rid)
        router.assign(unread)  # written before the router reads the notice ...
        fakes["a"].conn.transport.pause_reading()  # ... and never read by the replica
        if announced:
            await until(lambda: a.last_accepted is not None)
            assert a not in router.ready  # the notice alone takes it out of rotation
        router.assign(later)  # queued (announced) or sent to `a` too
        fakes["a"].conn.transport.abort()  # the replica process is gone
        await until(lambda: a.conn.closed)
        assert a not in router.ready and "a" not in router.entries  # never picked again
        router.update(DeploymentTargets(dep, [infos["b"]]))  # its replacement
        await until(lambda: len(fakes["b"].got) == (2 if announced else 0) and router.ready)
        outcomes = [r.outcome for r in (accepted, unread, later)]
        router.close()
        return outcomes, fakes

    (accepted, unread, later), fakes = asyncio.run(scenario())
    assert fakes["a"].got == [b"accepted"]
    assert isinstance(accepted, serve.ReplicaDiedError) and "Replica 'a'" in str(accepted)
    if announced:
        # Neither was accepted by `a`: both go to `b`, in their original order, still running there.
        assert fakes["b"].got == [b"unread", b"later"]
        assert unread is None and later is None
    else:
        # Without the notice, a request written to a replica that died may be what killed it.
        assert fakes["b"].got == []
        assert isinstance(unread, serve.ReplicaDiedError) and isinstance(later, serve.ReplicaDiedError)
