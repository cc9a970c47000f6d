"""`@serve.multiplexed` on its own: the per-replica LRU of models, called directly (no processes)."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import cloudpickle
import pytest

from shoal import multiplex
from shoal.context import RequestContext, _request_context
from shoal.multiplex import all_model_ids, model_ids_of, multiplexed, set_model_ids_listener


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Model:
    """A model that counts how often it was unloaded."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.deleted = 0

    def __del__(self) -> None:
        self.deleted += 1


class AsyncModel:
    def __init__(self, model_id: str, log: list):
        self.model_id = model_id
        self.log = log

    async def __del__(self) -> None:
        await asyncio.sleep(0)
        self.log.append(self.model_id)


class Loader:
    """A deployment-like class: its loader counts loads per id and hands out `Model`s."""

    def __init__(self) -> None:
        self.loads: list[str] = []

    @multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        self.loads.append(model_id)
        await asyncio.sleep(0)
        return Model(model_id)


@pytest.fixture
def listener():
    """Collects what the process-wide listener is told; removed afterwards."""
    gc.collect()  # caches of earlier tests' instances and functions must not count here
    seen: list[frozenset] = []
    set_model_ids_listener(seen.append)
    yield seen
    set_model_ids_listener(None)


# ----------------------------------------------------------------------------------------------
# Decoration


def test_decorator_forms() -> None:
    @multiplexed
    async def bare(model_id: str) -> str:
        return model_id

    @multiplexed()
    async def empty_parens(model_id: str) -> str:
        return model_id

    @multiplexed(max_num_models_per_replica=-1)
    async def unlimited(model_id: str) -> str:
        return model_id

    class C:
        @multiplexed(max_num_models_per_replica=1)
        async def load(self, model_id: str) -> str:
            return model_id

    assert bare.__name__ == "bare" and bare.max_num_models_per_replica == 3
    assert empty_parens.max_num_models_per_replica == 3
    assert unlimited.max_num_models_per_replica == -1
    assert C.load.max_num_models_per_replica == 1

    async def main() -> None:
        assert await bare("a") == "a"
        assert await empty_parens("b") == "b"
        assert await unlimited("c") == "c"
        assert await C().load("d") == "d"

    run(main())


def test_decorator_rejects_sync_and_wrong_arity() -> None:
    with pytest.raises(TypeError, match="async def"):
        @multiplexed
        def sync_load(model_id: str) -> str:
            return model_id

    with pytest.raises(TypeError, match="async def"):
        @multiplexed(max_num_models_per_replica=2)
        def sync_method(self, model_id: str) -> str:
            return model_id

    with pytest.raises(TypeError, match="0 parameter"):
        @multiplexed
        async def no_params() -> None:
            pass

    with pytest.raises(TypeError, match="1 parameter"):
        @multiplexed
        async def only_self(self) -> None:
            pass

    with pytest.raises(TypeError, match="3 parameter"):
        @multiplexed
        async def too_many(self, model_id: str, other: int) -> None:
            pass

    with pytest.raises(TypeError):
        @multiplexed
        async def keyword_only(*, model_id: str) -> None:
            pass

    with pytest.raises(TypeError):
        multiplexed(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -2])
def test_decorator_rejects_bad_max_num_models(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"max_num_models_per_replica.*positive integer.*-1"):
        @multiplexed(max_num_models_per_replica=bad)
        async def load(model_id: str) -> str:
            return model_id


@pytest.mark.parametrize("bad", [1.5, 2.0, "3", None, True])
def test_decorator_rejects_max_num_models_of_another_type(bad: Any) -> None:
    with pytest.raises(TypeError, match=r"max_num_models_per_replica must be an integer"):
        @multiplexed(max_num_models_per_replica=bad)
        async def load(model_id: str) -> str:
            return model_id


# ----------------------------------------------------------------------------------------------
# The LRU


def test_hits_do_not_reload_and_return_the_same_model() -> None:
    async def main() -> None:
        m = Loader()
        a = await m.get_model("a")
        assert await m.get_model("a") is a
        assert await m.get_model(model_id="a") is a
        assert m.loads == ["a"]
        assert a.deleted == 0

    run(main())


def test_lru_order_and_eviction_runs_sync_del_once() -> None:
    async def main() -> None:
        m = Loader()
        a = await m.get_model("a")
        b = await m.get_model("b")
        assert model_ids_of(m) == {"a", "b"}
        assert await m.get_model("a") is a  # a is now the most recently used: b goes first
        c = await m.get_model("c")
        assert m.loads == ["a", "b", "c"]
        assert model_ids_of(m) == {"a", "c"}
        assert (a.deleted, b.deleted, c.deleted) == (0, 1, 0)
        await m.get_model("d")  # a was used before c
        assert model_ids_of(m) == {"c", "d"}
        assert a.deleted == 1 and c.deleted == 0
        assert await m.get_model("b") is not b  # evicted: loaded again
        assert m.loads == ["a", "b", "c", "d", "b"]
        return a, b

    a, b = run(main())
    gc.collect()
    # The garbage collector must not run __del__ a second time, and the objects still work.
    assert (a.deleted, b.deleted) == (1, 1)
    assert isinstance(a, Model) and a.model_id == "a"


def test_sync_del_runs_off_the_loop_thread() -> None:
    threads: list[int] = []

    class Recorder:
        def __del__(self) -> None:
            threads.append(threading.get_ident())

    @multiplexed(max_num_models_per_replica=1)
    async def load(model_id: str) -> Recorder:
        return Recorder()

    async def main() -> None:
        await load("x")
        await load("y")

    run(main())
    assert threads and threads[0] != threading.get_ident()
    gc.collect()
    assert len(threads) == 1


def test_async_del_is_awaited_exactly_once() -> None:
    log: list[str] = []

    @multiplexed(max_num_models_per_replica=1)
    async def load(model_id: str) -> Any:
        return object() if model_id == "plain" else AsyncModel(model_id, log)

    async def main() -> AsyncModel:
        x = await load("x")
        await load("y")
        assert log == ["x"]
        await load("x")
        assert log == ["x", "y"]
        await load("plain")  # unload the last AsyncModel too (a collected one could not await __del__)
        assert log == ["x", "y", "x"]
        return x

    with_warnings = []
    import warnings
    with warnings.catch_warnings(record=True) as with_warnings:
        warnings.simplefilter("always")
        x = run(main())
        del x
        gc.collect()
    assert log == ["x", "y", "x"]
    assert not [w for w in with_warnings if "never awaited" in str(w.message)]


def test_del_that_raises_does_not_fail_the_next_load(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        raised = False

        def __del__(self) -> None:
            if not self.raised:  # once: were it collected later, it should not raise again
                self.raised = True
                raise RuntimeError("cannot unload")

    @multiplexed(max_num_models_per_replica=1)
    async def load(model_id: str) -> Any:
        return Broken() if model_id == "broken" else model_id

    async def main() -> None:
        await load("broken")
        assert await load("ok") == "ok"
        assert model_ids_of(load) == {"ok"}

    run(main())
    assert "cannot unload" in caplog.text


def test_unlimited_never_evicts() -> None:
    loads: list[str] = []

    @multiplexed(max_num_models_per_replica=-1)
    async def load(model_id: str) -> Model:
        loads.append(model_id)
        return Model(model_id)

    async def main() -> list[Model]:
        models = [await load(f"m{i}") for i in range(50)]
        for i in range(50):
            assert await load(f"m{i}") is models[i]
        return models

    models = run(main())
    assert len(loads) == 50
    assert model_ids_of(load) == {f"m{i}" for i in range(50)}
    assert all(m.deleted == 0 for m in models)


def test_two_instances_keep_separate_caches() -> None:
    async def main() -> None:
        one, two = Loader(), Loader()
        a1 = await one.get_model("a")
        a2 = await two.get_model("a")
        assert a1 is not a2
        await two.get_model("b")
        await two.get_model("c")  # evicts a from `two` only
        assert model_ids_of(one) == {"a"}
        assert model_ids_of(two) == {"b", "c"}
        assert model_ids_of(two.get_model) == {"b", "c"}
        assert await one.get_model("a") is a1
        assert (a1.deleted, a2.deleted) == (0, 1)
        assert one.loads == ["a"] and two.loads == ["a", "b", "c"]

    run(main())


def test_plain_function_cache_is_shared_by_callers() -> None:
    loads: list[str] = []

    @multiplexed(max_num_models_per_replica=2)
    async def load(model_id: str) -> str:
        loads.append(model_id)
        return model_id.upper()

    async def main() -> None:
        assert model_ids_of(load) == set()
        assert await load("a") == "A"
        assert await load("a") == "A"
        assert loads == ["a"]
        assert model_ids_of(load) == {"a"}

    run(main())
    run(_again(load))  # a later event loop sees the same cache
    assert loads == ["a"]


async def _again(load: Any) -> None:
    assert await load("a") == "A"


# ----------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_loads_of_one_id_run_the_loader_once() -> None:
    calls: list[str] = []

    async def main() -> None:
        release = asyncio.Event()

        @multiplexed(max_num_models_per_replica=2)
        async def load(model_id: str) -> Model:
            calls.append(model_id)
            await release.wait()
            return Model(model_id)

        waiters = [asyncio.ensure_future(load("a")) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert calls == ["a"]
        assert model_ids_of(load) == {"a"}  # reported while loading
        release.set()
        models = await asyncio.gather(*waiters)
        assert all(m is models[0] for m in models)
        assert calls == ["a"]

    run(main())


def test_different_ids_load_concurrently() -> None:
    async def main() -> None:
        running = 0
        peak = 0
        all_started = asyncio.Event()

        @multiplexed(max_num_models_per_replica=3)
        async def load(model_id: str) -> str:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if peak == 3:
                all_started.set()
            await asyncio.wait_for(all_started.wait(), 5)  # only returns if all three run at once
            running -= 1
            return model_id

        assert await asyncio.gather(load("a"), load("b"), load("c")) == ["a", "b", "c"]
        assert peak == 3

    run(main())


def test_eviction_keeps_models_in_memory_within_the_limit() -> None:
    async def main() -> None:
        in_memory = 0
        peak = 0
        loads: list[str] = []

        class Counted:
            def __init__(self, model_id: str):
                self.model_id = model_id

            async def __del__(self) -> None:
                nonlocal in_memory
                await asyncio.sleep(0.001)
                in_memory -= 1

        @multiplexed(max_num_models_per_replica=2)
        async def load(model_id: str) -> Any:
            nonlocal in_memory, peak
            if model_id.startswith("plain"):
                return object()
            in_memory += 1  # counts from the start of the load: it is allocating
            peak = max(peak, in_memory)
            loads.append(model_id)
            await asyncio.sleep(0.002)
            return Counted(model_id)

        seen: list[int] = []

        async def check_reported() -> None:
            while True:
                seen.append(len(model_ids_of(load)))
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(check_reported())
        ids = [f"m{i % 7}" for i in range(40)]
        models = await asyncio.gather(*(load(i) for i in ids))
        watcher.cancel()
        assert [m.model_id for m in models] == ids
        assert peak <= 2
        assert max(seen) <= 2
        assert len(model_ids_of(load)) == 2 and in_memory == 2
        await load("plain-1")  # unload what is left (plain models have no __del__)
        await load("plain-2")
        assert in_memory == 0

    run(main())


def test_failing_load_propagates_to_every_waiter_and_is_not_cached() -> None:
    attempts: list[str] = []

    async def main() -> None:
        release = asyncio.Event()
        fail = True

        @multiplexed(max_num_models_per_replica=1)
        async def load(model_id: str) -> str:
            attempts.append(model_id)
            await release.wait()
            if fail and model_id == "bad":
                raise KeyError(f"no model {model_id}")
            return model_id

        waiters = [asyncio.ensure_future(load("bad")) for _ in range(3)]
        await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, KeyError) and "no model bad" in str(r) for r in results)
        assert attempts == ["bad"]
        assert model_ids_of(load) == set()
        # The slot was freed: another id loads without anything to evict, and "bad" loads again later.
        assert await load("good") == "good"
        fail = False
        assert await load("bad") == "bad"
        assert attempts == ["bad", "good", "bad"]

    run(main())


def test_cancelled_caller_does_not_cancel_the_load_for_others() -> None:
    async def main() -> None:
        release = asyncio.Event()
        calls: list[str] = []

        @multiplexed
        async def load(model_id: str) -> str:
            calls.append(model_id)
            await release.wait()
            return model_id

        first = asyncio.ensure_future(load("a"))
        second = asyncio.ensure_future(load("a"))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0)
        release.set()
        assert await second == "a"
        assert first.cancelled()
        assert calls == ["a"]
        assert await load("a") == "a" and calls == ["a"]

    run(main())


# ----------------------------------------------------------------------------------------------
# Model id from the request context; arguments


def test_model_id_from_request_context() -> None:
    async def main() -> None:
        m = Loader()
        token = _request_context.set(RequestContext("req-1", "ctx-model"))
        try:
            model = await m.get_model()
        finally:
            _request_context.reset(token)
        assert model.model_id == "ctx-model"
        assert model_ids_of(m) == {"ctx-model"}
        with pytest.raises(ValueError, match="without a model id"):
            await m.get_model()  # the default context has no model id

    run(main())


def test_bad_model_ids_and_arguments() -> None:
    async def main() -> None:
        m = Loader()
        with pytest.raises(ValueError, match="non-empty"):
            await m.get_model("")
        with pytest.raises(TypeError, match="str"):
            await m.get_model(3)
        with pytest.raises(TypeError):
            await m.get_model("a", "b")
        with pytest.raises(TypeError):
            await m.get_model(name="a")
        assert m.loads == []

    run(main())


# ----------------------------------------------------------------------------------------------
# What the replica reports


def test_listener_sees_loading_loaded_and_evicted_ids(listener: list) -> None:
    async def main() -> None:
        release = asyncio.Event()

        class Deployment:
            @multiplexed(max_num_models_per_replica=2)
            async def load(self, model_id: str) -> str:
                await release.wait()
                return model_id

        d = Deployment()
        pending = asyncio.ensure_future(d.load("a"))
        await asyncio.sleep(0.01)
        assert listener == [frozenset({"a"})]  # reported while still loading
        release.set()
        await pending
        assert listener == [frozenset({"a"})]  # loading -> loaded is no change
        await d.load("b")
        await d.load("a")  # a hit: no change
        assert listener == [frozenset({"a"}), frozenset({"a", "b"})]
        await d.load("c")  # evicts b (a was used more recently)
        # b leaves and c (loading) takes its slot in one step: one change, never above the limit.
        assert listener == [frozenset({"a"}), frozenset({"a", "b"}), frozenset({"a", "c"})]
        assert all_model_ids() == frozenset({"a", "c"})

    run(main())


def test_listener_after_failed_load_and_its_errors_are_contained(listener: list,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    @multiplexed
    async def load(model_id: str) -> str:
        raise RuntimeError("boom")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await load("x")

    run(main())
    assert listener == [frozenset({"x"}), frozenset()]

    def broken(ids: frozenset) -> None:
        raise ValueError("listener broke")

    set_model_ids_listener(broken)

    @multiplexed
    async def fine(model_id: str) -> str:
        return model_id

    assert run(fine("y")) == "y"
    assert "listener broke" in caplog.text


def test_all_model_ids_spans_instances_and_functions(listener: list) -> None:
    @multiplexed
    async def fn_loader(model_id: str) -> str:
        return model_id

    async def main() -> Loader:
        m = Loader()
        await m.get_model("inst")
        await fn_loader("func")
        return m

    m = run(main())
    assert all_model_ids() == frozenset({"inst", "func"})
    assert model_ids_of(m) == {"inst"} and model_ids_of(fn_loader) == {"func"}
    assert model_ids_of(object()) == set()


def test_pickled_class_starts_with_an_empty_cache() -> None:
    class Deployment:
        @multiplexed(max_num_models_per_replica=2)
        async def load(self, model_id: str) -> str:
            return model_id

    @multiplexed
    async def fn(model_id: str) -> str:
        return model_id

    async def main() -> None:
        await Deployment().load("a")
        await fn("a")
        Copy = cloudpickle.loads(cloudpickle.dumps(Deployment))
        fn_copy = cloudpickle.loads(cloudpickle.dumps(fn))
        assert model_ids_of(fn_copy) == set()
        d = Copy()
        assert model_ids_of(d) == set()
        assert await d.load("b") == "b" and model_ids_of(d) == {"b"}
        assert await fn_copy("c") == "c" and model_ids_of(fn_copy) == {"c"} and model_ids_of(fn) == {"a"}

    run(main())


def test_module_exports() -> None:
    assert set(multiplex.__all__) == {"multiplexed", "model_ids_of", "all_model_ids", "set_model_ids_listener"}
