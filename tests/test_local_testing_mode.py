"""Local testing mode: the same programs run in one process, with no controller or replica processes."""

from __future__ import annotations

import asyncio

import pytest

from shoal import serve


@pytest.fixture(autouse=True)
def _cleanup():
    yield
    serve.shutdown()


@serve.deployment
class Retriever:
    def retrieve(self, q):
        return [f"doc-{q}"]


@serve.deployment
class Generator:
    async def generate(self, docs, q):
        return f"{q}: {docs[0]}"

    async def tokens(self, n):
        for i in range(n):
            yield i


@serve.deployment
class Pipeline:
    def __init__(self, retriever, generator):
        self.retriever, self.generator = retriever, generator

    async def __call__(self, q):
        docs = await self.retriever.retrieve.remote(q)
        return await self.generator.generate.remote(docs, q)


def test_basic_composition():
    h = serve.run(Pipeline.bind(Retriever.bind(), Generator.bind()), _local_testing_mode=True)
    assert h.remote("q").result() == "q: doc-q"
    assert asyncio.run(_await(h.remote("r"))) == "r: doc-r"


async def _await(r):
    return await r


def test_exception_raised_in_constructor():
    @serve.deployment
    class Broken:
        def __init__(self):
            raise RuntimeError("no good")

    with pytest.raises(RuntimeError, match="no good"):
        serve.run(Broken.bind(), _local_testing_mode=True)


def test_streaming_and_errors():
    h = serve.run(Generator.bind(), _local_testing_mode=True)
    assert list(h.options(stream=True).tokens.remote(3)) == [0, 1, 2]
    with pytest.raises(TypeError, match="generator"):
        h.tokens.remote(3).result()
    with pytest.raises(serve.RayServeException, match="Available methods"):
        h.nope.remote().result()


def test_reconfigure_and_response_arguments():
    @serve.deployment(user_config={"k": 3})
    class Mul:
        def reconfigure(self, cfg):
            self.k = cfg["k"]

        def __call__(self, x):
            return x * self.k

    h = serve.run(Mul.bind(), _local_testing_mode=True)
    assert h.remote(h.remote(2)).result() == 18


def test_forced_by_environment(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_FORCE_LOCAL_TESTING_MODE", "1")
    h = serve.run(Retriever.bind())
    assert h.retrieve.remote("x").result() == ["doc-x"]
    from shoal.client import get_global_client

    assert get_global_client(required=False) is None  # nothing was started
