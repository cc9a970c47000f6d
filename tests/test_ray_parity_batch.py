"""Ray Serve behaviours of `@serve.batch` and `@serve.multiplexed` that ported programs rely on.

Plain asyncio (no processes): every wait has a generous bound, so a regression fails instead of hanging,
and nothing depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from shoal import context as shoal_context
from shoal import serve
from shoal.context import RequestContext, _request_context

BOUND_S = 10.0  # "it eventually happened": far above anything these tests need


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, BOUND_S))


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


# --- async-generator batches: the request is queued when the function is called --------------------

@pytest.mark.parametrize("use_class", [False, True])
@pytest.mark.parametrize("length", [0, 2, 5])
def test_generators_created_first_then_consumed_one_by_one_share_a_batch(use_class, length):
    batches: list[list] = []

    class Model:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
        async def method(self, a, b):
            batches.append(list(a))
            for i in range(length):
                yield [(i, a[j], b[j]) for j in range(len(a))]

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def func(a, b):
        batches.append(list(a))
        for i in range(length):
            yield [(i, a[j], b[j]) for j in range(len(a))]

    fn = Model().method if use_class else func

    async def main():
        # Both requests are queued here: the batch (size 2) is full although nobody iterated yet.
        gens = [fn("x1", b="y1"), fn(b="y2", a="x2")]
        first = [item async for item in gens[0]]
        second = [item async for item in gens[1]]
        return first, second

    first, second = run(main())
    assert first == [(i, "x1", "y1") for i in range(length)]
    assert second == [(i, "x2", "y2") for i in range(length)]
    assert batches == [["x1", "x2"]]


@pytest.mark.parametrize("error", ["raise", "wrong_length"])
def test_generator_errors_reach_each_caller_consumed_in_turn(error):
    from shoal.exceptions import RayServeException

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def func(xs):
        for i in range(5):
            out = [(i, x) for x in xs]
            if i == 2:
                if error == "raise":
                    raise RuntimeError("boom at 2")
                yield out * 2
            yield out

    async def main():
        gens = [func("a"), func("b")]
        for name, gen in zip("ab", gens):
            assert [await gen.__anext__() for _ in range(2)] == [(0, name), (1, name)]
            with pytest.raises(RuntimeError if error == "raise" else RayServeException):
                await gen.__anext__()
            with pytest.raises(StopAsyncIteration):
                await gen.__anext__()

    run(main())


@pytest.mark.parametrize("stop", [StopIteration, StopAsyncIteration])
def test_callers_end_one_after_another(stop):
    n = 4

    async def main():
        step = asyncio.Event()

        @serve.batch(max_batch_size=n, batch_wait_timeout_s=1000)
        async def terminator(ids):
            for finished in range(1, n + 1):
                step.clear()
                yield [stop] * finished + list(ids[finished:])
                await step.wait()

        gens = [terminator(i) for i in range(n)]
        for i, gen in enumerate(gens):
            assert [x async for x in gen] == [i] * i  # caller i ends at the i-th yield
            step.set()

    run(main())


def test_setters_apply_to_batches_formed_after_them_while_one_streams():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def three(a, b):
        for _ in range(3):
            yield [(a[i], b[i]) for i in range(len(a))]

    async def main():
        old = [three("a1", "b1"), three("a2", "b2")]
        for gen, want in zip(old, [("a1", "b1"), ("a2", "b2")]):
            assert [await gen.__anext__() for _ in range(2)] == [want, want]
        three.set_max_batch_size(3)
        new = [three(f"n{i}", f"m{i}") for i in range(3)]
        for gen, want in zip(old, [("a1", "b1"), ("a2", "b2")]):
            assert [x async for x in gen] == [want]
        for i, gen in enumerate(new):
            assert [x async for x in gen] == [(f"n{i}", f"m{i}")] * 3

    run(main())


def test_a_generator_made_outside_an_event_loop_queues_on_first_iteration():
    @serve.batch(max_batch_size=1)
    async def func(xs):
        yield [x + 1 for x in xs]

    gen = func(1)  # no running loop: nothing to queue on yet

    async def main():
        return [x async for x in gen]

    assert run(main()) == [2]


def test_a_dropped_generator_stops_counting_as_a_listener():
    async def main():
        finished = asyncio.Event()

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
        async def endless(xs):
            try:
                i = 0
                while True:
                    yield [i] * len(xs)
                    i += 1
                    await asyncio.sleep(0)
            finally:
                finished.set()

        kept = endless("kept")
        dropped = endless("dropped")
        assert await kept.__anext__() == 0  # the batch holds both requests
        del dropped  # never iterated: its caller went away
        gc.collect()
        assert [await kept.__anext__() for _ in range(2)] == [1, 2]
        await kept.aclose()
        # With no listener left the batched generator is closed instead of running forever.
        await finished.wait()

    run(main())


@pytest.mark.parametrize("use_gen", [False, True])
def test_cancelled_callers_leave_the_queue_usable(use_gen):
    async def main():
        release = asyncio.Event()

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
        async def unary(a, b):
            await release.wait()
            return [(a[i], b[i]) for i in range(len(a))]

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
        async def streaming(a, b):
            await release.wait()
            yield [(a[i], b[i]) for i in range(len(a))]

        def start():
            if use_gen:
                return [asyncio.ensure_future(g.__anext__()) for g in (streaming("1", "2"), streaming("3", "4"))]
            return [asyncio.ensure_future(unary("1", "2")), asyncio.ensure_future(unary("3", "4"))]

        tasks = start()
        await settle()
        assert not any(t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        release.set()
        assert await asyncio.gather(*start()) == [("1", "2"), ("3", "4")]

    run(main())


# --- request contexts inside a batch -------------------------------------------------------------

def test_the_request_context_inside_a_batch_is_empty_and_each_request_keeps_its_own():
    seen: list[dict] = []

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=1000, max_concurrent_batches=2)
    async def handle_batch(xs):
        current = shoal_context._get_serve_request_context()
        seen.append({
            "ids": [c.request_id for c in shoal_context._get_serve_batch_request_context()],
            "current": (current.request_id, current.route, current.app_name, current.multiplexed_model_id),
            "model": serve.get_multiplexed_model_id(),
        })
        return ["ok"] * len(xs)

    async def call(i):
        _request_context.set(RequestContext(request_id=f"r{i}", app_name="app", route="/x"))
        return await handle_batch(i)

    async def main():
        assert await asyncio.gather(*[call(i) for i in range(6)]) == ["ok"] * 6
        # Outside the batch nothing leaks.
        assert shoal_context._get_serve_batch_request_context() == []
        assert serve.get_multiplexed_model_id() == ""

    run(main())
    assert len(seen) == 2
    assert sorted(i for s in seen for i in s["ids"]) == [f"r{i}" for i in range(6)]
    for s in seen:
        assert len(s["ids"]) == 3
        assert s["current"] == ("", "", "", "")
        assert s["model"] == ""


def test_sub_batches_of_different_models_run_concurrently_with_their_own_model_id():
    running = 0
    peak = 0
    models_seen: list[tuple] = []

    async def main():
        nonlocal running, peak
        all_started = asyncio.Event()

        @serve.batch(max_batch_size=9, batch_wait_timeout_s=1000)  # max_concurrent_batches=1
        async def predict(xs):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running == 3:
                all_started.set()
            await all_started.wait()  # sequential sub-batches would never get here: the test times out
            await asyncio.sleep(0)
            models_seen.append((serve.get_multiplexed_model_id(), sorted(xs)))
            running -= 1
            return [f"{serve.get_multiplexed_model_id()}:{x}" for x in xs]

        async def call(x, model):
            _request_context.set(RequestContext(request_id=f"r{x}", multiplexed_model_id=model))
            return await predict(x)

        calls = [call(i, f"m{i % 3}") for i in range(9)]
        return await asyncio.gather(*calls)

    out = run(main())
    assert out == [f"m{i % 3}:{i}" for i in range(9)]
    assert peak == 3
    assert sorted(models_seen) == [("m0", [0, 3, 6]), ("m1", [1, 4, 7]), ("m2", [2, 5, 8])]


def test_sub_batches_together_take_one_of_max_concurrent_batches():
    started: list[str] = []

    async def main():
        release = asyncio.Event()

        @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000, max_concurrent_batches=1)
        async def predict(xs):
            started.append(serve.get_multiplexed_model_id())
            await release.wait()
            return xs

        async def call(x, model):
            _request_context.set(RequestContext(multiplexed_model_id=model))
            return await predict(x)

        first = [asyncio.ensure_future(call(1, "a")), asyncio.ensure_future(call(2, "b"))]
        await settle()
        later = [asyncio.ensure_future(call(3, "c")), asyncio.ensure_future(call(4, "c"))]
        await settle()
        assert sorted(started) == ["a", "b"]  # both halves of the first batch run, the next batch waits
        release.set()
        assert await asyncio.gather(*first, *later) == [1, 2, 3, 4]
        assert started[2:] == ["c"]

    run(main())


# --- @serve.multiplexed argument checks ---------------------------------------------------------------

@pytest.mark.parametrize("bad", ["1", 1.5, 2.0, None, True])
def test_max_num_models_per_replica_of_the_wrong_type_is_a_type_error(bad):
    with pytest.raises(TypeError, match="max_num_models_per_replica"):
        @serve.multiplexed(max_num_models_per_replica=bad)
        async def load(model_id: str):
            return model_id


@pytest.mark.parametrize("bad", [0, -2])
def test_max_num_models_per_replica_not_positive_is_a_value_error(bad):
    with pytest.raises(ValueError, match="max_num_models_per_replica"):
        @serve.multiplexed(max_num_models_per_replica=bad)
        async def load(model_id: str):
            return model_id


# --- multiplexed routing: a busy model spills onto an idle replica ---------------------------------

class _Replica:
    def __init__(self, name: str, models=(), inflight: int = 0, cap: int = 1):
        self.replica_id, self.queue_len, self.max_ongoing_requests = name, inflight, cap
        self.multiplexed_model_ids = set(models)
        self.node_id = ""

    def has_capacity(self) -> bool:
        return self.queue_len < self.max_ongoing_requests


class _ModelRequest:
    def __init__(self, model: str, queued_for_s: float = 0.0):
        self.multiplexed_model_id = model
        self.queued_for_s = queued_for_s


def _choose(replicas, model, queued_for_s=0.0):
    from shoal.router.pow2 import PowerOfTwoChoicesRequestRouter

    return PowerOfTwoChoicesRequestRouter().choose_replica(replicas, _ModelRequest(model, queued_for_s))


def test_a_model_sticks_to_its_replica_while_it_has_room():
    a, b, c = _Replica("a", {"1"}, cap=5), _Replica("b"), _Replica("c")
    assert all(_choose([a, b, c], "1") is a for _ in range(50))


def test_a_busy_model_spills_onto_the_replica_holding_the_fewest_models_at_once():
    holder = _Replica("a", {"1"}, inflight=1)
    idle = _Replica("b")
    assert all(_choose([holder, idle], "1") is idle for _ in range(50))
    # Several holders, all full: still an idle one, with the fewest models.
    holders = [_Replica(f"h{i}", {"1", "x"}, inflight=1) for i in range(3)]
    other, empty = _Replica("o", {"2", "3"}), _Replica("e", {"4"})
    assert all(_choose(holders + [other, empty], "1") is empty for _ in range(50))


def test_a_new_model_goes_to_the_replica_holding_the_fewest_models():
    busy_with_many = _Replica("a", {"1", "2"}, cap=5)
    few = _Replica("b", {"3"}, cap=5)
    assert all(_choose([busy_with_many, few], "9") is few for _ in range(50))


def test_after_the_matching_window_any_replica_with_room_takes_it():
    from shoal.router.pow2 import MODEL_MATCH_WINDOW_S

    holder = _Replica("a", {"1"}, inflight=1)          # full
    crowded = _Replica("b", {"2", "3"}, inflight=0)    # room, but more models than the holder
    assert _choose([holder, crowded], "1") is None     # within the window: wait for the model's tier
    assert _choose([holder, crowded], "1", MODEL_MATCH_WINDOW_S + 0.1) is crowded
    assert _choose([_Replica("z", inflight=1)], "1", 99.0) is None  # nothing has room: queue


def test_requests_without_a_model_are_unaffected():
    a, b = _Replica("a", {"1"}, inflight=1), _Replica("b", {"2"})
    assert all(_choose([a, b], "") is b for _ in range(50))


def test_ray_private_context_names_work():
    from shoal import context

    async def main():
        assert serve.get_multiplexed_model_id() == ""
        context._serve_request_context.set(context._RequestContext(multiplexed_model_id="1"))
        assert serve.get_multiplexed_model_id() == "1"
        assert context._get_serve_request_context().multiplexed_model_id == "1"
        assert context._get_serve_batch_request_context() == []

    run(main())
