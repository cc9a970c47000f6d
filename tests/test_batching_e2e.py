"""`@serve.batch` in real replicas, through handles and over HTTP."""

from __future__ import annotations

import asyncio

import httpx

from shoal import serve
from shoal.api import get_http_url


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
