"""Calls and HTTP as Ray Serve makes them, over real replica processes and the proxy.

- an HTTP `__call__` (or function deployment) without parameters is called without the request;
- `serve.ingress(app_or_builder)()` with no class makes a default ingress class;
- a method that *returns* a generator streams with `stream=True`; misuse raises Ray's `TypeError`s;
- a missing method's error lists the callable non-dunder attributes, as Ray does.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from shoal import serve
from shoal.api import get_http_url
from shoal.replica.user_callable import UserCallable


@pytest.fixture
def url(serve_app) -> str:
    return get_http_url()


# --- 1. HTTP `__call__` without parameters ---------------------------------------------------------


@serve.deployment
class NoArgSync:
    def __init__(self, msg: str):
        self.msg = msg

    def __call__(self):
        return self.msg


@serve.deployment
class NoArgAsync:
    async def __call__(self) -> dict:
        return {"ok": True}


@serve.deployment
class NoArgGenerator:
    def __call__(self):
        for i in range(3):
            yield f"{i};"


@serve.deployment
def no_arg_function():
    return "from a function"


@serve.deployment
class VarArgs:
    def __call__(self, *args):
        return type(args[0]).__name__  # the request is passed when `__call__` takes any parameter


def test_http_call_without_parameters_gets_no_request(url):
    serve.run(NoArgSync.bind("Hello world!"), name="sync", route_prefix="/sync")
    serve.run(NoArgAsync.bind(), name="async", route_prefix="/async")
    serve.run(NoArgGenerator.bind(), name="gen", route_prefix="/gen")
    serve.run(no_arg_function.bind(), name="fn", route_prefix="/fn")
    serve.run(VarArgs.bind(), name="varargs", route_prefix="/varargs")
    r = httpx.get(url + "/sync")
    assert (r.status_code, r.text) == (200, "Hello world!")
    r = httpx.post(url + "/async", json={"ignored": 1})
    assert (r.status_code, r.json()) == (200, {"ok": True})
    r = httpx.get(url + "/gen")
    assert (r.status_code, r.text) == (200, "0;1;2;")
    r = httpx.get(url + "/fn")
    assert (r.status_code, r.text) == (200, "from a function")
    r = httpx.get(url + "/varargs")
    assert (r.status_code, r.text) == (200, "Request")


def test_composition_with_no_argument_calls_over_http_and_handles(url):
    """Ray's key-concepts example: every `__call__` takes no argument, reached by HTTP and by handles."""

    @serve.deployment
    class Hello:
        def __call__(self) -> str:
            return "Hello"

    @serve.deployment
    class World:
        def __call__(self) -> str:
            return " world!"

    @serve.deployment
    class Ingress:
        def __init__(self, hello, world):
            self.hello, self.world = hello, world

        async def __call__(self) -> str:
            hello, world = self.hello.remote(), self.world.remote()
            return (await hello) + (await world)

    handle = serve.run(Ingress.bind(Hello.bind(), World.bind()))
    assert handle.remote().result() == "Hello world!"
    r = httpx.get(url + "/")
    assert (r.status_code, r.text) == (200, "Hello world!")


# --- 3. serve.ingress(...)() without a class --------------------------------------------------------


@serve.deployment
class Sub:
    def __call__(self):
        return "from the sub-deployment"


def build_app():
    """A builder, run in the replica: FastAPI is imported there, the handle made there."""
    from fastapi import Depends, FastAPI

    app = FastAPI()

    def sub_handle():
        return serve.get_deployment_handle("Sub", app_name="built")

    @app.get("/hi")
    async def hi(handle=Depends(sub_handle)):
        return await handle.remote()

    return app


def test_ingress_of_a_builder_without_a_class(url):
    cls = serve.ingress(build_app)()
    assert cls.__name__ == "ASGIIngressDeployment"
    deployment = serve.deployment(cls)
    assert deployment.name == "ASGIIngressDeployment"
    serve.run(deployment.bind(Sub.bind()), name="built", route_prefix="/built")
    r = httpx.get(url + "/built/hi")
    assert (r.status_code, r.json()) == (200, "from the sub-deployment")


def test_ingress_of_an_app_without_a_class(url):
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    def root():
        bound = serve.get_replica_context().servable_object  # the default class keeps `.bind()`'s arguments
        return {"args": list(bound.args), "kwargs": bound.kwargs}

    cls = serve.ingress(app)()
    assert cls is not serve.ingress(app)()  # a class per call: each records its own app
    serve.run(serve.deployment(cls).bind("kept", key="value"), route_prefix="/app")
    r = httpx.get(url + "/app/")
    assert (r.status_code, r.json()) == (200, {"args": ["kept"], "kwargs": {"key": "value"}})


# --- 4. methods that return generators ---------------------------------------------------------------


@serve.deployment
class Returns:
    def sync_gen(self, n):
        return (i for i in range(n))

    async def async_gen(self, n):
        async def items():
            for i in range(n):
                await asyncio.sleep(0)
                yield i * 10

        return items()

    def sync_returns_async_gen(self, n):
        async def items():
            for i in range(n):
                yield -i

        return items()

    def slow_gen(self, n):
        def items():
            for i in range(n):
                yield i
                if i == 0:
                    time.sleep(30)  # the first item must not wait for this

        return items()

    def generator_function(self, n):
        yield from range(n)

    async def not_a_generator(self, n):
        return [n]

    def __call__(self, request):
        return (f"{i}," for i in range(3))


def test_methods_returning_generators_stream(serve_app):
    h = serve.run(Returns.bind())
    stream = h.options(stream=True)
    assert list(stream.sync_gen.remote(4)) == [0, 1, 2, 3]
    assert list(stream.async_gen.remote(3)) == [0, 10, 20]
    assert list(stream.sync_returns_async_gen.remote(3)) == [0, -1, -2]

    async def from_a_loop():
        return [x async for x in stream.async_gen.remote(2)]

    assert asyncio.run(from_a_loop()) == [0, 10]
    # Items arrive as they are produced: the first does not wait for the rest of the generator.
    gen = stream.slow_gen.remote(2)
    assert next(gen) == 0
    gen.cancel()


def test_generator_misuse_raises_rays_type_errors(serve_app):
    h = serve.run(Returns.bind())
    for method in ("sync_gen", "async_gen", "generator_function"):
        with pytest.raises(TypeError) as exc:
            getattr(h, method).remote(2).result()
        assert str(exc.value) == (f"Method '{method}' returned a generator. You must use "
                                  "`handle.options(stream=True)` to call generators on a deployment.")
    with pytest.raises(TypeError) as exc:
        list(h.options(stream=True).not_a_generator.remote(1))
    assert str(exc.value) == ("Called method 'not_a_generator' with `handle.options(stream=True)` but it did "
                              "not return a generator.")
    # The replica is fine afterwards.
    assert h.not_a_generator.remote(5).result() == [5]


def test_http_call_returning_a_generator_streams(url):
    serve.run(Returns.bind(), route_prefix="/returns")
    r = httpx.get(url + "/returns")
    assert (r.status_code, r.text) == (200, "0,1,2,")


# --- 7. the missing-method error ---------------------------------------------------------------------


@serve.deployment
class Methods:
    def exists(self):
        return 1

    async def _helper(self):
        return 2

    not_callable = 3


@serve.deployment
class MethodsWithCall:
    def __call__(self):
        return 0

    def other(self):
        return 1


def test_missing_method_error_lists_what_the_class_has(serve_app):
    h = serve.run(Methods.bind(), name="plain", route_prefix=None)
    with pytest.raises(serve.RayServeException) as exc:
        h.remote().result()  # no `__call__` on this class
    assert str(exc.value).startswith(
        "Tried to call a method '__call__' that does not exist. Available methods: ['_helper', 'exists'].")
    h2 = serve.run(MethodsWithCall.bind(), name="with_call", route_prefix=None)
    with pytest.raises(serve.RayServeException) as exc:
        h2.nope.remote().result()
    assert str(exc.value).startswith(
        "Tried to call a method 'nope' that does not exist. Available methods: ['other'].")


def test_function_deployment_answers_any_method_name():
    """As in Ray: a function deployment has one callable, whatever method the handle names."""

    def f(x):
        return x + 1

    uc = UserCallable(f, (), {}, "f")
    asyncio.run(uc.initialize())
    assert asyncio.run(uc.call("anything", (1,), {})) == 2
