"""`@serve.batch` (shoal.batching), exercised in plain asyncio: no processes, no timing assertions."""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
from typing import Any

import cloudpickle
import pytest

from shoal import context as shoal_context
from shoal.batching import batch, get_batch_request_contexts
from shoal.context import RequestContext, _request_context, get_multiplexed_model_id
from shoal.exceptions import RayServeException


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def settle(turns: int = 20) -> None:
    """Let every ready task run a few steps (callers reach their queue, runners form batches)."""
    for _ in range(turns):
        await asyncio.sleep(0)


# --- decorator and options ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, words", [
    ({"max_batch_size": 0}, ValueError, "max_batch_size"),
    ({"max_batch_size": -3}, ValueError, "max_batch_size"),
    ({"max_batch_size": 1.1}, TypeError, "max_batch_size"),
    ({"max_batch_size": "10"}, TypeError, "max_batch_size"),
    ({"max_batch_size": True}, TypeError, "max_batch_size"),
    ({"batch_wait_timeout_s": -0.1}, ValueError, "batch_wait_timeout_s"),
    ({"batch_wait_timeout_s": float("nan")}, ValueError, "batch_wait_timeout_s"),
    ({"batch_wait_timeout_s": "1"}, TypeError, "batch_wait_timeout_s"),
    ({"max_concurrent_batches": 0}, ValueError, "max_concurrent_batches"),
    ({"max_concurrent_batches": 1.5}, TypeError, "max_concurrent_batches"),
    ({"batch_size_fn": 3}, TypeError, "batch_size_fn"),
])
def test_decorator_rejects_bad_options(kwargs, error, words):
    with pytest.raises(error, match=words):
        batch(**kwargs)


def test_decorator_accepts_good_options():
    @batch(max_batch_size=4.0, batch_wait_timeout_s=0, max_concurrent_batches=2.0, batch_size_fn=len)
    async def f(xs):
        return xs

    assert f._get_max_batch_size() == 4 and isinstance(f._get_max_batch_size(), int)
    assert f._get_batch_wait_timeout_s() == 0.0
    assert f._get_max_concurrent_batches() == 2


def test_decorator_requires_async_def():
    def sync(xs):
        return xs

    with pytest.raises(TypeError, match="must be 'async def'"):
        batch(sync)
    with pytest.raises(TypeError, match="must be 'async def'"):
        batch(max_batch_size=2)(sync)
    with pytest.raises(TypeError, match="only positional argument"):
        batch(5)  # options must be keywords


def test_both_forms_keep_the_function_kind_and_name():
    @batch
    async def plain(xs):
        return xs

    @batch()
    async def called(xs):
        return xs

    @batch(max_batch_size=3)
    async def gen(xs):
        yield xs

    for f in (plain, called):
        assert inspect.iscoroutinefunction(f)
        assert f._get_max_batch_size() == 10 and f._get_batch_wait_timeout_s() == 0.01
    # As in Ray Serve, a batched generator function is a plain function that queues the request when
    # called and returns the caller's async generator.
    assert not inspect.iscoroutinefunction(gen) and gen.__name__ == "gen"

    async def items():
        agen = gen(4)
        assert inspect.isasyncgen(agen)
        return [x async for x in agen]

    assert run(items()) == [4]
    assert plain.__name__ == "plain" and plain.__wrapped__ is not None
    assert run(plain(3)) == 3


# --- how batches form -----------------------------------------------------------------------------

def test_concurrent_calls_fill_batches_in_order():
    sizes: list[int] = []

    class Model:
        @batch(max_batch_size=10, batch_wait_timeout_s=0.05)
        async def double(self, xs: list) -> list:
            sizes.append(len(xs))
            await asyncio.sleep(0)
            return [x * 2 for x in xs]

    async def main():
        m = Model()
        return await asyncio.gather(*[m.double(i) for i in range(25)])

    assert run(main()) == [i * 2 for i in range(25)]
    assert sizes == [10, 10, 5]


def test_lone_caller_is_flushed_by_the_timeout():
    sizes: list[int] = []

    @batch(max_batch_size=10, batch_wait_timeout_s=0.05)
    async def f(xs):
        sizes.append(len(xs))
        return [x + 1 for x in xs]

    assert run(f(1)) == 2
    assert sizes == [1]


def test_zero_timeout_takes_what_is_queued():
    sizes: list[int] = []

    @batch(max_batch_size=5, batch_wait_timeout_s=0)
    async def f(xs):
        sizes.append(len(xs))
        return xs

    async def main():
        assert await asyncio.gather(*[f(i) for i in range(12)]) == list(range(12))
        for i in range(3):  # one at a time: nobody to wait for
            assert await f(i) == i

    run(main())
    assert sizes == [5, 5, 2, 1, 1, 1]


def test_requests_arriving_during_a_batch_form_the_next_one():
    sizes: list[int] = []

    async def main():
        release = asyncio.Event()

        @batch(max_batch_size=4, batch_wait_timeout_s=10)
        async def f(xs):
            sizes.append(len(xs))
            await release.wait()
            return xs

        first = asyncio.ensure_future(asyncio.gather(*[f(i) for i in range(4)]))
        await settle()
        later = asyncio.ensure_future(asyncio.gather(*[f(i) for i in range(4, 8)]))
        await settle()
        assert sizes == [4]  # the second batch waits for the running one (max_concurrent_batches=1)
        release.set()
        assert await first == [0, 1, 2, 3]
        assert await later == [4, 5, 6, 7]

    run(main())
    assert sizes == [4, 4]


def test_runner_stops_when_idle():
    @batch(max_batch_size=3, batch_wait_timeout_s=0)
    async def f(xs):
        return xs

    async def main():
        await asyncio.gather(*[f(i) for i in range(7)])
        await settle()
        assert asyncio.all_tasks() == {asyncio.current_task()}

    run(main())


# --- arguments and results ------------------------------------------------------------------------

def test_each_argument_becomes_a_list():
    seen: list[tuple] = []

    class Model:
        @batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def handle(self, a, b, *, c=0):
            seen.append((list(a), list(b), c))
            return [x + y + (z or 0) for x, y, z in zip(a, b, c if isinstance(c, list) else [c] * len(a))]

    async def main():
        m = Model()
        same = await asyncio.gather(m.handle(1, 10, c=100), m.handle(2, 20, c=200))
        mixed = await asyncio.gather(m.handle(1, 10), m.handle(2, b=20), m.handle(a=3, b=30, c=300))
        return same, mixed

    same, mixed = run(main())
    assert same == [111, 222]
    assert seen[0] == ([1, 2], [10, 20], [100, 200])
    # Different shapes are bound to the signature: positional or keyword, defaults filled in.
    assert mixed == [11, 22, 333]
    assert seen[1] == ([1, 2, 3], [10, 20, 30], [0, 0, 300])


def test_plain_function_args_and_kwargs():
    @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def add(xs, ys):
        return [x + y for x, y in zip(xs, ys)]

    async def main():
        return await asyncio.gather(add(1, 2), add(3, ys=4), add(xs=5, ys=6), add(7, 8))

    assert run(main()) == [3, 7, 11, 15]


def test_bad_arguments_fail_only_that_caller():
    @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def f(xs):
        return xs

    async def main():
        return await asyncio.gather(f(1), f(2, 3), f(xs=4), return_exceptions=True)

    good1, bad, good2 = run(main())
    assert (good1, good2) == (1, 4)
    assert isinstance(bad, TypeError)


def test_exception_reaches_every_caller_and_the_queue_goes_on():
    calls = 0

    @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
    async def f(xs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("boom")
        return xs

    async def main():
        failed = await asyncio.gather(*[f(i) for i in range(3)], return_exceptions=True)
        assert all(isinstance(e, ValueError) and str(e) == "boom" for e in failed)
        assert await asyncio.gather(f(1), f(2)) == [1, 2]

    run(main())


@pytest.mark.parametrize("bad_result", [[1], [1, 2, 3, 4]])
def test_result_of_the_wrong_length_fails_every_caller(bad_result):
    @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
    async def f(xs):
        return bad_result

    async def main():
        return await asyncio.gather(*[f(i) for i in range(3)], return_exceptions=True)

    errors = run(main())
    assert len(errors) == 3
    for e in errors:
        assert isinstance(e, RayServeException)
        assert "doesn't preserve batch size" in str(e)


@pytest.mark.parametrize("bad_result", [None, 3, "abc", {1: 1, 2: 2, 3: 3}])
def test_a_result_that_is_not_a_list_is_a_type_error(bad_result):
    # As in Ray Serve (where taking the result's length fails): TypeError, not RayServeException.
    @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
    async def f(xs):
        return bad_result

    @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
    async def g(xs):
        yield bad_result

    async def main():
        unary = await asyncio.gather(*[f(i) for i in range(3)], return_exceptions=True)

        async def drain(agen):
            return [x async for x in agen]

        streams = await asyncio.gather(*[drain(g(i)) for i in range(3)], return_exceptions=True)
        return unary + streams

    errors = run(main())
    assert len(errors) == 6
    for e in errors:
        assert type(e) is TypeError, e
        assert "must" in str(e) and "a list with one element per input" in str(e)


# --- cancellation ---------------------------------------------------------------------------------

def test_callers_cancelled_before_their_batch_are_dropped():
    batches: list[list] = []

    async def main():
        release = asyncio.Event()

        @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def f(xs):
            batches.append(list(xs))
            await release.wait()
            return xs

        first = asyncio.ensure_future(asyncio.gather(*[f(i) for i in range(4)]))
        await settle()
        waiting = [asyncio.ensure_future(f(i)) for i in (10, 11, 12, 13)]
        await settle()
        waiting[1].cancel()
        waiting[3].cancel()
        await settle()
        release.set()
        assert await first == [0, 1, 2, 3]
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert results[0] == 10 and results[2] == 12
        assert isinstance(results[1], asyncio.CancelledError) and isinstance(results[3], asyncio.CancelledError)

    run(main())
    assert batches == [[0, 1, 2, 3], [10, 12]]


def test_caller_cancelled_during_its_batch_gets_cancelled_error():
    async def main():
        release = asyncio.Event()
        started = asyncio.Event()

        @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
        async def f(xs):
            started.set()
            await release.wait()
            return xs

        tasks = [asyncio.ensure_future(f(i)) for i in range(3)]
        await started.wait()
        tasks[0].cancel()
        await settle()
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        assert results[1:] == [1, 2]

    run(main())


# --- async generators -----------------------------------------------------------------------------

def test_generator_gives_each_caller_its_own_stream():
    @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def count(starts):
        for step in range(3):
            yield [s + step for s in starts]

    async def collect(x):
        return [item async for item in count(x)]

    async def main():
        return await asyncio.gather(collect(0), collect(10), collect(100))

    assert run(main()) == [[0, 1, 2], [10, 11, 12], [100, 101, 102]]


def test_generator_stop_values_end_one_caller():
    class Model:
        @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def stream(self, lengths):
            for step in range(4):
                out = []
                for n in lengths:
                    if step < n:
                        out.append(step)
                    elif n == 0:
                        out.append(StopIteration)
                    elif n == 1:
                        out.append(StopIteration())
                    else:
                        out.append(StopAsyncIteration)
                yield out

    async def collect(m, n):
        return [item async for item in m.stream(n)]

    async def main():
        m = Model()
        return await asyncio.gather(*[collect(m, n) for n in (0, 1, 2, 4)])

    assert run(main()) == [[], [0], [0, 1], [0, 1, 2, 3]]


def test_generator_caller_that_leaves_early_does_not_stop_the_others():
    produced: list[int] = []

    @batch(max_batch_size=2, batch_wait_timeout_s=0.05)
    async def gen(xs):
        for step in range(5):
            produced.append(step)
            yield [step] * len(xs)
            await asyncio.sleep(0)

    async def take_two():
        out = []
        agen = gen(0)
        async for item in agen:
            out.append(item)
            if len(out) == 2:
                break
        await agen.aclose()
        return out

    async def take_all():
        return [item async for item in gen(1)]

    async def main():
        return await asyncio.gather(take_two(), take_all())

    assert run(main()) == [[0, 1], [0, 1, 2, 3, 4]]
    assert produced == [0, 1, 2, 3, 4]


def test_generator_stops_when_every_caller_is_done():
    produced: list[int] = []

    @batch(max_batch_size=2, batch_wait_timeout_s=0.05)
    async def gen(xs):
        for step in range(100):
            produced.append(step)
            yield [StopIteration if step >= 2 else step for _ in xs]

    async def main():
        return await asyncio.gather(*[_collect(gen, i) for i in range(2)])

    assert run(main()) == [[0, 1], [0, 1]]
    assert produced == [0, 1, 2]


async def _collect(gen: Any, x: Any) -> list:
    return [item async for item in gen(x)]


def test_generator_errors_reach_every_stream():
    @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
    async def gen(xs):
        yield list(xs)
        raise KeyError("gone")

    @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
    async def wrong_length(xs):
        yield [1]

    async def collect(g, x):
        items = []
        try:
            async for item in g(x):
                items.append(item)
        except Exception as e:  # noqa: BLE001
            return items, e
        return items, None

    async def main():
        errors = await asyncio.gather(*[collect(gen, i) for i in range(3)])
        for i, (items, e) in enumerate(errors):
            assert items == [i] and isinstance(e, KeyError)
        wrong = await asyncio.gather(*[collect(wrong_length, i) for i in range(2)])
        for items, e in wrong:
            assert items == [] and isinstance(e, RayServeException) and "batch size" in str(e)

    run(main())


# --- batch_size_fn --------------------------------------------------------------------------------

def test_batch_size_fn_defers_the_item_that_would_overflow():
    batches: list[list] = []

    def total_length(items: list) -> int:
        return sum(len(s) for s in items)

    @batch(max_batch_size=10, batch_wait_timeout_s=0.05, batch_size_fn=total_length)
    async def f(texts):
        batches.append(list(texts))
        return [t.upper() for t in texts]

    async def main():
        return await asyncio.gather(f("aaaa"), f("bbbb"), f("cccc"), f("ddd"), f("e" * 10))

    assert run(main()) == ["AAAA", "BBBB", "CCCC", "DDD", "E" * 10]
    # 4+4 fits, +4 would make 12 > 10: "cccc" starts the next batch; 4+3 fits; the 10 is alone.
    assert batches == [["aaaa", "bbbb"], ["cccc", "ddd"], ["e" * 10]]


def test_batch_size_fn_rejects_an_item_too_large_for_any_batch():
    batches: list[list] = []

    @batch(max_batch_size=5, batch_wait_timeout_s=0.05, batch_size_fn=lambda items: sum(items))
    async def f(sizes):
        batches.append(list(sizes))
        return sizes

    def broken_size(items):
        raise ZeroDivisionError("no size")

    @batch(max_batch_size=5, batch_wait_timeout_s=0.05, batch_size_fn=broken_size)
    async def g(xs):
        return xs

    async def main():
        results = await asyncio.gather(f(2), f(6), f(3), return_exceptions=True)
        assert results[0] == 2 and results[2] == 3
        assert isinstance(results[1], RuntimeError) and "max_batch_size" in str(results[1])
        with pytest.raises(ZeroDivisionError):
            await g(1)

    run(main())
    assert batches == [[2, 3]]


# --- concurrency of batches -----------------------------------------------------------------------

@pytest.mark.parametrize("max_concurrent, expected", [(1, 1), (2, 2), (3, 3)])
def test_max_concurrent_batches_bounds_overlap(max_concurrent, expected):
    async def main():
        running = 0
        most = 0
        release = asyncio.Event()

        @batch(max_batch_size=2, batch_wait_timeout_s=0, max_concurrent_batches=max_concurrent)
        async def f(xs):
            nonlocal running, most
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1
            return xs

        tasks = asyncio.ensure_future(asyncio.gather(*[f(i) for i in range(8)]))
        await settle(50)
        assert running == expected
        release.set()
        assert await tasks == list(range(8))
        return most

    assert run(main()) == expected


# --- runtime knobs --------------------------------------------------------------------------------

def test_runtime_setters_change_later_batches():
    sizes: list[int] = []

    class Model:
        @batch(max_batch_size=10, batch_wait_timeout_s=0.05)
        async def f(self, xs):
            sizes.append(len(xs))
            return xs

    async def main():
        m = Model()
        m.f.set_max_batch_size(3)
        m.f.set_batch_wait_timeout_s(0)
        assert m.f._get_max_batch_size() == 3 and Model.f._get_max_batch_size() == 3
        assert m.f._get_batch_wait_timeout_s() == 0
        await asyncio.gather(*[m.f(i) for i in range(7)])
        Model.f.set_max_batch_size(5.0)
        await asyncio.gather(*[m.f(i) for i in range(7)])

    run(main())
    assert sizes == [3, 3, 1, 5, 2]
    with pytest.raises(ValueError, match="max_batch_size"):
        Model.f.set_max_batch_size(0)
    with pytest.raises(TypeError, match="max_batch_size"):
        Model.f.set_max_batch_size(2.5)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        Model.f.set_batch_wait_timeout_s(-1)
    assert Model.f._get_max_batch_size() == 5


def test_setters_are_per_decorated_function():
    shared = batch(max_batch_size=4)

    @shared
    async def a(xs):
        return xs

    @shared
    async def b(xs):
        return xs

    a.set_max_batch_size(2)
    assert (a._get_max_batch_size(), b._get_max_batch_size()) == (2, 4)


# --- methods, instances, loops --------------------------------------------------------------------

def test_each_instance_has_its_own_queue():
    calls: list[tuple] = []

    class Model:
        def __init__(self, name):
            self.name = name

        @batch(max_batch_size=10, batch_wait_timeout_s=0.05)
        async def f(self, xs):
            calls.append((self.name, sorted(xs)))
            return [f"{self.name}:{x}" for x in xs]

    async def main():
        a, b = Model("a"), Model("b")
        return await asyncio.gather(a.f(1), b.f(2), a.f(3), b.f(4))

    assert run(main()) == ["a:1", "b:2", "a:3", "b:4"]
    assert sorted(calls) == [("a", [1, 3]), ("b", [2, 4])]


def test_subclass_calling_super_and_slotted_class():
    class Base:
        @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def f(self, xs):
            return [(type(self).__name__, x) for x in xs]

    class Child(Base):
        async def f(self, x):
            return await super().f(x)

    class Slotted:
        __slots__ = ("__weakref__",)

        @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def f(self, xs):
            return [x * 2 for x in xs]

    async def main():
        c = Child()
        s = Slotted()
        assert await asyncio.gather(c.f(1), c.f(2)) == [("Child", 1), ("Child", 2)]
        assert await asyncio.gather(s.f(1), s.f(2)) == [2, 4]

    run(main())


def test_a_function_works_across_event_loops_and_after_pickling():
    @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def f(xs):
        return [x * 3 for x in xs]

    async def main(fn):
        return await asyncio.gather(fn(1), fn(2))

    assert run(main(f)) == [3, 6]
    assert run(main(f)) == [3, 6]  # a new loop gets a new queue
    copy = cloudpickle.loads(cloudpickle.dumps(f))
    assert run(main(copy)) == [3, 6]
    assert copy._get_max_batch_size() == 4

    class Model:  # a class defined here travels by value, like one from a driver's __main__
        @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def f(self, xs):
            return [x * 5 for x in xs]

        @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
        async def g(self, xs):
            yield [x * 7 for x in xs]

    async def use(cls):
        m = cls()
        g_items = [item async for item in m.g(1)]
        return await asyncio.gather(m.f(1), m.f(2)), g_items

    assert run(use(Model)) == ([5, 10], [7])
    Model.f.set_max_batch_size(3)
    copied = cloudpickle.loads(cloudpickle.dumps(Model))
    assert run(use(copied)) == ([5, 10], [7])
    assert copied.f._get_max_batch_size() == 3


def test_multiplexed_model_ids_split_a_batch():
    calls: list[tuple] = []

    @batch(max_batch_size=10, batch_wait_timeout_s=0.05)
    async def f(xs):
        contexts = get_batch_request_contexts()
        calls.append((get_multiplexed_model_id(), list(xs), [c.request_id for c in contexts]))
        return xs

    async def call(x, model_id):
        _request_context.set(RequestContext(request_id=f"r{x}", multiplexed_model_id=model_id))
        return await f(x)

    async def main():
        return await asyncio.gather(call(1, "m1"), call(2, "m2"), call(3, "m1"), call(4, ""))

    assert run(main()) == [1, 2, 3, 4]
    assert calls == [("m1", [1, 3], ["r1", "r3"]), ("m2", [2], ["r2"]), ("", [4], ["r4"])]
    assert get_batch_request_contexts() == []


# --- the max_ongoing_requests warning -------------------------------------------------------------

def _fake_replica(max_ongoing_requests: int) -> Any:
    return types.SimpleNamespace(_deployment_config=types.SimpleNamespace(max_ongoing_requests=max_ongoing_requests))


def test_warns_once_when_max_ongoing_requests_is_too_small(monkeypatch, caplog):
    monkeypatch.setattr(shoal_context, "_replica_context", _fake_replica(5))

    class Model:
        @batch(max_batch_size=4, max_concurrent_batches=2, batch_wait_timeout_s=0)
        async def small(self, xs):
            return xs

        @batch(max_batch_size=5, batch_wait_timeout_s=0)
        async def fits(self, xs):
            return xs

    async def main():
        a, b = Model(), Model()
        await asyncio.gather(a.small(1), b.small(2), a.fits(3))
        await a.small(4)

    with caplog.at_level(logging.WARNING, logger="shoal.batching"):
        run(main())
    warnings = [r for r in caplog.records if r.name == "shoal.batching" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "max_ongoing_requests is 5" in message and "small" in message and "at least 8" in message


def test_no_warning_outside_a_replica(caplog):
    assert shoal_context._replica_context is None

    @batch(max_batch_size=1000)
    async def f(xs):
        return xs

    with caplog.at_level(logging.WARNING, logger="shoal.batching"):
        assert run(f(1)) == 1
    assert not [r for r in caplog.records if r.name == "shoal.batching"]
