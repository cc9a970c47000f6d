"""Handles over real replica processes: calls, errors, streaming, composition, cancellation."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from shoal import serve
from shoal.exceptions import DeploymentUnavailableError

from conftest import wait_for


@serve.deployment
class Signal:
    """A test helper deployment: callers wait on it until someone sends."""

    def __init__(self):
        self.event = asyncio.Event()
        self.waiters = 0

    async def wait(self):
        self.waiters += 1
        try:
            await self.event.wait()
        finally:
            self.waiters -= 1

    def send(self, clear: bool = False):
        self.event.set()
        if clear:
            self.event = asyncio.Event()

    def num_waiters(self):
        return self.waiters


@serve.deployment
class WaitsForSignal:
    """A test helper deployment: each call waits on a `Signal` and counts how often it was cancelled."""

    def __init__(self, sig):
        self.sig = sig
        self.cancelled = 0

    async def __call__(self, *args):
        try:
            await self.sig.wait.remote()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "done"

    def num_cancelled(self):
        return self.cancelled


@serve.deployment
class Echo:
    def __call__(self, x=None):
        return x

    async def aecho(self, x, *, suffix=""):
        return f"{x}{suffix}"

    def fail(self, msg):
        raise KeyError(msg)

    def gen(self, n):
        for i in range(n):
            yield i

    async def agen(self, n):
        for i in range(n):
            yield i

    def gen_fails(self, n):
        yield 0
        raise ValueError(f"failed after one of {n}")

    def exists(self):
        return True


def test_sync_and_async_methods_and_function_deployment(serve_app):
    h = serve.run(Echo.bind())
    assert h.remote(1).result() == 1
    assert h.aecho.remote("a", suffix="!").result() == "a!"
    assert h.options(method_name="aecho").remote("b").result() == "b"

    @serve.deployment
    def double(x):
        return 2 * x

    h2 = serve.run(double.bind(), name="fn", route_prefix="/fn")
    assert h2.remote(21).result() == 42


def test_response_is_awaitable_and_repeatable_from_asyncio(serve_app):
    h = serve.run(Echo.bind())

    async def main():
        r = h.aecho.remote("x")
        assert await r == "x"
        assert await r == "x"
        results = await asyncio.gather(*[h.remote(i) for i in range(200)])
        assert results == list(range(200))

    asyncio.run(main())
    r = h.remote(5)
    assert r.result() == 5 and r.result() == 5


def test_handles_work_from_threads(serve_app):
    h = serve.run(Echo.bind())
    out: dict[int, list] = {}

    def worker(k):
        out[k] = [h.remote(k * 100 + i).result() for i in range(50)]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(out[k] == [k * 100 + i for i in range(50)] for k in range(4))


def test_user_exception_keeps_type_and_message(serve_app):
    h = serve.run(Echo.bind())
    with pytest.raises(KeyError, match="boom") as exc:
        h.fail.remote("boom").result()
    assert "Traceback of the remote error" in "".join(getattr(exc.value, "__notes__", []))

    async def main():
        with pytest.raises(KeyError, match="boom2"):
            await h.fail.remote("boom2")

    asyncio.run(main())


def test_missing_method_names_available_ones(serve_app):
    h = serve.run(Echo.bind())
    with pytest.raises(serve.RayServeException) as exc:
        h.does_not_exist.remote().result()
    assert "'does_not_exist'" in str(exc.value)
    assert "Available methods:" in str(exc.value) and "'exists'" in str(exc.value)


def test_result_timeout_then_success(serve_app):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    @serve.deployment
    class Waiter:
        def __init__(self, sig):
            self.sig = sig

        async def __call__(self):
            await self.sig.wait.remote()
            return "done"

    h = serve.run(Waiter.bind(sig), name="waiter", route_prefix="/w")
    r = h.remote()
    with pytest.raises(TimeoutError):
        r.result(timeout_s=0.2)
    sig.send.remote().result()
    assert r.result(timeout_s=10) == "done"


def test_sync_result_inside_event_loop_is_refused(serve_app):
    h = serve.run(Echo.bind())

    async def main():
        r = h.remote(1)
        with pytest.raises(RuntimeError, match="Sync methods should not be called"):
            r.result()
        await r

    asyncio.run(main())


def test_streaming_sync_and_async_generators(serve_app):
    h = serve.run(Echo.bind())
    assert list(h.options(stream=True).gen.remote(5)) == [0, 1, 2, 3, 4]
    assert list(h.options(stream=True).agen.remote(3)) == [0, 1, 2]

    async def main():
        return [x async for x in h.options(stream=True).agen.remote(4)]

    assert asyncio.run(main()) == [0, 1, 2, 3]


def test_streaming_errors(serve_app):
    h = serve.run(Echo.bind())
    with pytest.raises(TypeError, match="Method 'gen' returned a generator. You must use"):
        h.gen.remote(3).result()
    with pytest.raises(TypeError, match="Called method 'aecho' with `handle.options.stream=True.` but it did not "
                                        "return a generator"):
        list(h.options(stream=True).aecho.remote(3))
    items = []
    with pytest.raises(ValueError, match="failed after one of 3"):
        for x in h.options(stream=True).gen_fails.remote(3):
            items.append(x)
    assert items == [0]


def test_stream_items_arrive_before_generator_finishes(serve_app):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    @serve.deployment
    class Slow:
        def __init__(self, sig):
            self.sig = sig

        async def stream(self):
            yield "first"
            await self.sig.wait.remote()
            yield "second"

    h = serve.run(Slow.bind(sig), name="slow", route_prefix="/s")
    gen = h.options(stream=True).stream.remote()
    assert next(gen) == "first"  # the generator is still blocked on the signal here
    sig.send.remote().result()
    assert list(gen) == ["second"]


def test_composition_pipeline(serve_app):
    @serve.deployment
    class Retriever:
        def retrieve(self, query):
            return [f"doc-{query}-{i}" for i in range(2)]

    @serve.deployment
    class Generator:
        async def generate(self, docs, query):
            return f"{query}: {' '.join(docs)}"

    @serve.deployment
    class Pipeline:
        def __init__(self, retriever, generator):
            self.retriever = retriever
            self.generator = generator

        async def __call__(self, query):
            docs = await self.retriever.retrieve.remote(query)
            return await self.generator.generate.remote(docs, query)

    h = serve.run(Pipeline.bind(Retriever.bind(), Generator.bind()))
    assert h.remote("q").result() == "q: doc-q-0 doc-q-1"
    assert set(serve.status().applications["default"].deployments) == {"Pipeline", "Retriever", "Generator"}


def test_responses_as_arguments_and_nested_error(serve_app):
    @serve.deployment
    class Adder:
        def add(self, a, b=0):
            return a + b

    h = serve.run(Adder.bind())
    a = h.add.remote(1, b=2)
    b = h.add.remote(a, b=h.add.remote(10))
    assert b.result() == 13
    with pytest.raises(serve.RayServeException, match="not serializable"):
        h.add.remote([h.add.remote(1)]).result()

    failing = h.add.remote("x", b=1)  # str + int fails in the replica
    with pytest.raises(TypeError):
        h.add.remote(failing).result()


def test_unpicklable_argument_gives_clear_error(serve_app):
    h = serve.run(Echo.bind())
    lock = threading.Lock()
    with pytest.raises(TypeError, match="Could not serialize argument 0 \\(lock\\)"):
        h.remote(lock).result()


def test_cancel_during_execution_reaches_replica(serve_app):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    h = serve.run(WaitsForSignal.bind(sig), name="blocker", route_prefix="/b")
    r = h.remote()
    wait_for(lambda: sig.num_waiters.remote().result() == 1, what="the call to reach the signal")
    r.cancel()
    with pytest.raises(serve.RequestCancelledError):
        r.result()
    assert r.cancelled()
    wait_for(lambda: h.num_cancelled.remote().result() == 1, what="the replica to see the cancellation")
    # The downstream call the replica made was cancelled too.
    wait_for(lambda: sig.num_waiters.remote().result() == 0, what="the downstream call to be cancelled")


def test_only_the_cancelled_request_is_cancelled(serve_app):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)
    r1 = sig.wait.remote()
    r2 = sig.wait.remote()
    wait_for(lambda: sig.num_waiters.remote().result() == 2)
    r1.cancel()
    with pytest.raises(serve.RequestCancelledError):
        r1.result()
    sig.send.remote().result()
    assert r2.result(timeout_s=10) is None


def test_cancel_generator(serve_app):
    @serve.deployment
    class Forever:
        async def stream(self):
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)

    h = serve.run(Forever.bind())
    gen = h.options(stream=True).stream.remote()
    assert next(gen) == 0
    gen.cancel()
    with pytest.raises(serve.RequestCancelledError):
        for _ in gen:
            pass


def test_max_ongoing_requests_is_enforced(serve_app):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    @serve.deployment(max_ongoing_requests=2)
    class Limited:
        def __init__(self, sig):
            self.sig = sig
            self.now = 0
            self.peak = 0

        async def __call__(self):
            self.now += 1
            self.peak = max(self.peak, self.now)
            await self.sig.wait.remote()
            self.now -= 1

        def peak_seen(self):
            return self.peak

    h = serve.run(Limited.bind(sig), name="limited", route_prefix="/l")
    responses = [h.remote() for _ in range(6)]
    wait_for(lambda: sig.num_waiters.remote().result() == 2)
    time.sleep(0.3)
    assert sig.num_waiters.remote().result() == 2  # the other four wait in the caller's queue
    sig.send.remote().result()
    [r.result(timeout_s=20) for r in responses]
    assert h.peak_seen.remote().result() == 2


def test_max_ongoing_requests_enforced_across_callers(serve_app):
    """Two independent callers (driver sync loop and an asyncio loop) share one replica's limit."""
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    @serve.deployment(max_ongoing_requests=1)
    class One:
        def __init__(self, sig):
            self.sig = sig
            self.now = self.peak = self.calls = 0

        async def __call__(self):
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)
            await self.sig.wait.remote()
            self.now -= 1

        def stats(self):
            return self.peak, self.calls

    h = serve.run(One.bind(sig), name="one", route_prefix="/one")
    sync_responses = [h.remote() for _ in range(3)]

    async def other_caller():
        rs = [h.remote() for _ in range(3)]
        await asyncio.sleep(0.3)
        sig.send.remote()
        return await asyncio.gather(*rs)

    asyncio.run(other_caller())
    [r.result(timeout_s=20) for r in sync_responses]
    assert h.stats.remote().result() == (1, 6)


def test_replica_death_fails_request_and_is_replaced(serve_app):
    @serve.deployment
    class Fragile:
        def pid(self):
            return os.getpid()

        def die(self):
            os._exit(1)

    h = serve.run(Fragile.bind())
    pid = h.pid.remote().result()
    with pytest.raises(serve.ReplicaDiedError, match="died while handling request"):
        h.die.remote().result(timeout_s=20)
    # The call waits in the router until the replacement runs: its start-up may take many seconds under load.
    new_pid = h.pid.remote().result(timeout_s=60)
    assert new_pid != pid
    wait_for(lambda: serve.status().applications["default"].status == serve.ApplicationStatus.RUNNING)


def test_multiplexed_model_id_reaches_replica(serve_app):
    @serve.deployment
    class M:
        def __call__(self):
            return serve.get_multiplexed_model_id()

    h = serve.run(M.bind())
    assert h.remote().result() == ""
    assert h.options(multiplexed_model_id="m1").remote().result() == "m1"


def test_handle_is_picklable_and_options_chain(serve_app):
    import pickle

    h = serve.run(Echo.bind())
    h2 = pickle.loads(pickle.dumps(h.options(method_name="aecho")))
    assert h2.remote("p").result() == "p"
    assert h.options(stream=True).options(method_name="gen").remote(2) is not None
    with pytest.raises(TypeError, match="unexpected option"):
        h.options(foo=1)


def test_calls_to_deleted_deployment_fail(serve_app):
    h = serve.run(Echo.bind(), name="gone", route_prefix="/gone")
    assert h.remote(1).result() == 1
    serve.delete("gone")
    with pytest.raises(DeploymentUnavailableError):
        h.remote(1).result(timeout_s=10)


def test_many_event_loops_do_not_leak_connections(serve_app):
    h = serve.run(Echo.bind())

    async def call(i):
        return await h.remote(i)

    assert [asyncio.run(call(i)) for i in range(20)] == list(range(20))  # one-time set-up happens here
    before = len(os.listdir("/proc/self/fd"))
    assert [asyncio.run(call(i)) for i in range(40)] == list(range(40))
    assert len(os.listdir("/proc/self/fd")) <= before + 5  # a leak would add one socket per loop: 40


@serve.deployment
class Counter:
    def __init__(self):
        self.n = 0

    def incr(self):
        self.n += 1

    def get(self):
        return self.n


def _get_from_asyncio(app_name: str) -> int:
    """Read the counter through an asyncio caller (its own router, not the sync callers' loop)."""

    async def main():
        return await serve.get_app_handle(app_name).get.remote()

    return asyncio.run(main())


def test_fire_and_forget_calls_are_sent_eagerly(serve_app):
    h = serve.run(Counter.bind(), name="counter", route_prefix="/c")
    for _ in range(3):
        h.incr.remote()  # never waited on: still sent, and executed
    wait_for(lambda: _get_from_asyncio("counter") == 3, what="fire-and-forget calls to run")


def test_sync_response_awaited_from_asyncio(serve_app):
    h = serve.run(Counter.bind(), name="counter", route_prefix="/c")
    h.incr.remote().result()
    r = h.get.remote()  # made in sync code, awaited in an event loop

    async def main():
        return await r

    assert asyncio.run(main()) == 1


def test_sync_callers_in_threads_progress_while_one_waits(serve_app):
    """A thread blocked on a long call must not hold up other threads' calls."""
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)
    h = serve.run(Echo.bind(), name="echo", route_prefix="/e")
    h.remote(0).result()
    blocked = {}

    def long_call():
        blocked["result"] = sig.wait.remote().result(timeout_s=60)

    t = threading.Thread(target=long_call)
    t.start()
    wait_for(lambda: sig.num_waiters.remote().result() == 1, what="the long call to start")
    # The long call is still waiting on the signal, yet these complete.
    assert [h.remote(i).result(timeout_s=30) for i in range(20)] == list(range(20))
    assert t.is_alive()
    sig.send.remote().result()
    t.join(timeout=30)
    assert not t.is_alive() and blocked["result"] is None


def test_async_methods_run_inside_a_task(serve_app):
    """`asyncio.timeout()` and `current_task()` work in user code, from the first line on."""

    @serve.deployment
    class UsesTimeout:
        async def __call__(self):
            async with asyncio.timeout(5):
                return asyncio.current_task() is not None

    assert serve.run(UsesTimeout.bind()).remote().result() is True
