"""`@serve.batch` in real replicas, through handles and over HTTP."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.responses import StreamingResponse

from shoal import serve
from shoal.api import get_http_url
from shoal.context import _get_serve_batch_request_context, _get_serve_request_context


@serve.deployment(max_ongoing_requests=64)
class Batched:
    def __init__(self):
        self.sizes = []

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def double(self, xs: list):
        self.sizes.append(len(xs))
        await asyncio.sleep(0.05)  # slow enough that concurrent callers pile up into full batches
        return [2 * x for x in xs]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def tokens(self, prompts: list):
        for step in range(3):
            yield [f"{p}-{step}" for p in prompts]

    async def __call__(self, request):
        return await self.double(int(request.query_params["x"]))

    def batch_sizes(self):
        return self.sizes


def test_concurrent_handle_calls_form_batches(serve_app):
    h = serve.run(Batched.bind())

    async def main():
        return await asyncio.gather(*[h.double.remote(i) for i in range(24)])

    assert asyncio.run(main()) == [2 * i for i in range(24)]
    sizes = h.batch_sizes.remote().result()
    assert sum(sizes) == 24 and max(sizes) == 8


def test_batched_generator_streams_reach_the_right_callers(serve_app):
    h = serve.run(Batched.bind())

    async def main():
        async def collect(p):
            return [t async for t in h.options(stream=True).tokens.remote(p)]

        return await asyncio.gather(*[collect(f"p{i}") for i in range(6)])

    out = asyncio.run(main())
    assert out == [[f"p{i}-{s}" for s in range(3)] for i in range(6)]


def test_batching_over_http(serve_app):
    serve.run(Batched.bind())
    url = get_http_url()

    async def main():
        async with httpx.AsyncClient() as client:
            rs = await asyncio.gather(*[client.get(url + "/", params={"x": i}) for i in range(16)])
        return [r.json() for r in rs]

    assert asyncio.run(main()) == [2 * i for i in range(16)]


@serve.deployment
class NoListReturned:
    @serve.batch(max_batch_size=5)
    async def handle_batch(self, requests):
        return len(requests)

    async def __call__(self, request):
        return await self.handle_batch(request)


def test_a_batch_result_that_is_not_a_list_raises_type_error_in_the_caller(serve_app):
    h = serve.run(NoListReturned.bind())
    with pytest.raises(TypeError, match="list with one element per input"):
        h.remote(1).result()


@serve.deployment(max_ongoing_requests=10)
class BatchContexts:
    def __init__(self):
        self.seen = []

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=1000, max_concurrent_batches=2)
    async def handle_batch(self, items):
        current = _get_serve_request_context()
        self.seen.append({
            "ids": [c.request_id for c in _get_serve_batch_request_context()],
            "current": [current.request_id, current.route, current.app_name, current.multiplexed_model_id],
        })
        return ["ok"] * len(items)

    async def __call__(self, request):
        return await self.handle_batch(1)

    def results(self):
        return self.seen


def test_inside_a_batch_the_request_context_is_empty_and_the_batch_holds_each_requests(serve_app):
    h = serve.run(BatchContexts.bind())
    url = get_http_url() + "/"

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(url, headers={"x-request-id": f"req-{i}"})
                                          for i in range(6)])

    assert [r.text for r in asyncio.run(main())] == ["ok"] * 6
    seen = h.results.remote().result()
    assert len(seen) == 2
    assert sorted(i for s in seen for i in s["ids"]) == [f"req-{i}" for i in range(6)]
    assert all(len(s["ids"]) == 3 and s["current"] == ["", "", "", ""] for s in seen)


@serve.deployment
class Textgen:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=1000)
    async def batch_handler(self, prompts):
        for _ in range(10):
            yield [{"value": p} for p in prompts]  # unhashable items are fine

    async def value_extractor(self, responses):
        async for r in responses:
            yield r["value"]

    async def __call__(self, request):
        # The batched generator is called here but iterated only later, by the response: the request
        # must already be queued (else four callers never fill the batch of 4).
        return StreamingResponse(self.value_extractor(self.batch_handler(request.query_params["prompt"])))


def test_batched_generator_behind_a_streaming_response(serve_app):
    serve.run(Textgen.bind())
    url = get_http_url() + "/"

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.get(url, params={"prompt": f"hola{i}"}) for i in range(4)])

    for i, r in enumerate(asyncio.run(main())):
        assert r.status_code == 200 and r.text == f"hola{i}" * 10


@serve.deployment(max_ongoing_requests=30)
class MultiplexedBatches:
    def __init__(self):
        self.running = 0
        self.peak = 0

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str):
        return f"model-{model_id}"

    @serve.batch(max_batch_size=9, batch_wait_timeout_s=1000)  # exactly one batch of the 9 calls
    async def predict(self, xs):
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            model = await self.get_model(serve.get_multiplexed_model_id())
            for _ in range(200):  # hold the batch until its sibling sub-batches started (bounded)
                if self.peak >= 3:
                    break
                await asyncio.sleep(0.01)
            return [f"{model}:{x}" for x in xs]
        finally:
            self.running -= 1

    async def __call__(self, x):
        return await self.predict(x)

    def peak_concurrency(self):
        return self.peak


def test_one_batch_for_three_models_runs_three_calls_at_once(serve_app):
    h = serve.run(MultiplexedBatches.bind())

    async def main():
        return await asyncio.gather(*[h.options(multiplexed_model_id=f"m{i % 3}").remote(i) for i in range(9)])

    assert asyncio.run(main()) == [f"model-m{i % 3}:{i}" for i in range(9)]
    assert h.peak_concurrency.remote().result() == 3
