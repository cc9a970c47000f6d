"""`@serve.ingress` and `ASGIIngress`, exercised by calling the ASGI apps directly (no processes)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
import weakref
from typing import Any, AsyncIterator, Iterator, Optional

import cloudpickle
import httpx
import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, Request, WebSocket
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from shoal import serve
from shoal.deployment import Deployment
from shoal.http.ingress import ASGI_APP_ATTR, ASGIIngress, ingress, is_ingress


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def client(ing: ASGIIngress) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=ing.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def starlette_test_client() -> Any:
    """Starlette's TestClient (for WebSockets); it warns about httpx vs httpx2 on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    return TestClient


class Item(BaseModel):
    name: str
    price: float


class PublicItem(BaseModel):
    name: str


def make_api() -> tuple[FastAPI, type, list]:
    """A class-based FastAPI view defined in a function, so cloudpickle ships it by value."""
    app = FastAPI(title="items")
    calls: list = []

    def multiplier() -> int:
        return 10

    @ingress(app)
    class ItemsAPI:
        def __init__(self, prefix: str):
            self.prefix = prefix
            self.done: list = []

        @app.get("/hello")
        def hello(self, name: str) -> dict:
            return {"msg": f"{self.prefix} {name}"}

        @app.post("/items/{item_id}", status_code=201)
        async def create(self, item_id: int, item: Item, factor: int = Depends(multiplier)) -> Item:
            return Item(name=f"{self.prefix}-{item.name}-{item_id}", price=item.price * factor)

        @app.get("/public/{name}", response_model=PublicItem, tags=["public"], summary="One public item")
        async def public(self, name: str) -> Any:
            return {"name": f"{self.prefix}{name}", "price": 99.0}  # price is filtered out

        @app.get("/missing/{key}")
        async def missing(self, key: str) -> dict:
            raise HTTPException(status_code=404, detail=f"{self.prefix}: no {key}")

        @app.post("/later", status_code=202)
        async def later(self, tasks: BackgroundTasks) -> dict:
            tasks.add_task(self.done.append, "background")
            return {"queued": True}

        @app.get("/lines")
        async def lines(self) -> AsyncIterator[dict]:
            for i in range(3):
                yield {"i": i, "by": self.prefix}

        @app.get("/unfiltered", response_model=None)
        async def unfiltered(self) -> PublicItem:
            return {"name": self.prefix, "price": 1.0}  # type: ignore[return-value]  # not validated

        @app.get("/count")
        def count_up(self, n: int) -> Iterator[str]:
            for i in range(n):
                yield f"{self.prefix}{i}"

        @app.websocket("/ws")
        async def ws(self, websocket: WebSocket) -> None:
            await websocket.accept()
            while True:
                text = await websocket.receive_text()
                if text == "bye":
                    await websocket.close()
                    return
                await websocket.send_text(f"{self.prefix}: {text}")

        def plain_method(self, x: int) -> int:
            return x + 1

    @app.get("/plain")
    def plain_function() -> dict:
        return {"plain": True}

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        calls.append(request.url.path)
        response = await call_next(request)
        response.headers["x-counted"] = str(len(calls))
        return response

    return app, ItemsAPI, calls


# ---------------------------------------------------------------------------------------------
# Class-based views


def test_class_based_view_gets_self_and_keeps_fastapi_features() -> None:
    app, cls, calls = make_api()
    instance = cls("A")

    async def main() -> None:
        ing = await ASGIIngress.create(instance)
        async with client(ing) as c:
            r = await c.get("/hello", params={"name": "bob"})
            assert r.status_code == 200 and r.json() == {"msg": "A bob"}
            assert r.headers["x-counted"] == "1"  # middleware still runs

            r = await c.post("/items/7", json={"name": "pen", "price": 1.5})
            assert r.status_code == 201
            assert r.json() == {"name": "A-pen-7", "price": 15.0}

            assert (await c.post("/items/x", json={"name": "pen", "price": 1})).status_code == 422
            assert (await c.get("/hello")).status_code == 422  # required query parameter

            r = await c.get("/public/cup")
            assert r.json() == {"name": "Acup"}  # response_model filtered `price`

            r = await c.get("/missing/k")
            assert r.status_code == 404 and r.json() == {"detail": "A: no k"}

            r = await c.post("/later")
            assert r.status_code == 202 and instance.done == ["background"]

            r = await c.get("/lines")
            assert [line for line in r.text.splitlines() if line] == [
                '{"i":0,"by":"A"}', '{"i":1,"by":"A"}', '{"i":2,"by":"A"}']

            assert (await c.get("/plain")).json() == {"plain": True}

            assert (await c.get("/unfiltered")).json() == {"name": "A", "price": 1.0}  # explicit None kept
            r = await c.get("/count", params={"n": 3})
            assert [line for line in r.text.splitlines() if line] == ['"A0"', '"A1"', '"A2"']

    run(main())
    assert instance.plain_method(1) == 2  # other methods are untouched


def test_openapi_hides_self_and_keeps_route_options() -> None:
    app, cls, _ = make_api()

    assert "self" in str(app.openapi())  # cached before the routes were bound

    async def main() -> None:
        ing = await ASGIIngress.create(cls("A"))
        assert ing.docs_path == "/docs"
        async with client(ing) as c:
            schema = (await c.get("/openapi.json")).json()
            assert (await c.get("/docs")).status_code == 200
        hello = schema["paths"]["/hello"]["get"]
        assert [p["name"] for p in hello["parameters"]] == ["name"]
        create = schema["paths"]["/items/{item_id}"]["post"]
        assert [p["name"] for p in create["parameters"]] == ["item_id"]
        assert "201" in create["responses"]
        public = schema["paths"]["/public/{name}"]["get"]
        assert public["tags"] == ["public"] and public["summary"] == "One public item"
        assert public["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PublicItem")
        for path in schema["paths"].values():
            for op in path.values():
                assert all(p["name"] != "self" for p in op.get("parameters", []))

    run(main())


def test_two_instances_in_one_process_each_get_their_own_self() -> None:
    app, cls, _ = make_api()

    async def main() -> None:
        first = await ASGIIngress.create(cls("first"))
        second = await ASGIIngress.create(cls("second"))
        assert first.asgi_app is second.asgi_app is app
        async with client(first) as c1, client(second) as c2:
            results = await asyncio.gather(*(
                c.get("/hello", params={"name": str(i)}) for i in range(20) for c in (c1, c2)))
        for i, r in enumerate(results):
            assert r.json() == {"msg": f"{'first' if i % 2 == 0 else 'second'} {i // 2}"}

    run(main())


def test_routes_need_the_ingress_to_supply_self() -> None:
    app, cls, _ = make_api()

    async def main() -> None:
        await ASGIIngress.create(cls("A"))
        transport = httpx.ASGITransport(app=app)  # the bare app: nobody supplies `self`
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            with pytest.raises(RuntimeError, match="only when served through its deployment"):
                await c.get("/hello", params={"name": "x"})
            assert (await c.get("/plain")).json() == {"plain": True}

    run(main())


def test_websocket_echo_through_a_class_method() -> None:
    app, cls, _ = make_api()

    async def create() -> ASGIIngress:
        return await ASGIIngress.create(cls("ws"))

    ing = run(create())
    with starlette_test_client()(ing.app) as c, c.websocket_connect("/ws") as ws:
        ws.send_text("hi")
        assert ws.receive_text() == "ws: hi"
        ws.send_text("again")
        assert ws.receive_text() == "ws: again"
        ws.send_text("bye")


def test_inherited_route_methods_bind_the_subclass_instance() -> None:
    app = FastAPI()

    class Base:
        @app.get("/who")
        def who(self) -> str:
            return self.name()

        def name(self) -> str:
            return "base"

    @ingress(app)
    class Child(Base):
        def name(self) -> str:
            return "child"

    async def main() -> None:
        async with client(await ASGIIngress.create(Child())) as c:
            assert (await c.get("/who")).json() == "child"

    run(main())


def test_a_decorator_above_the_route_decorator_is_fine() -> None:
    app = FastAPI()

    def traced(fn: Any) -> Any:
        import functools

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)
        return wrapper

    @ingress(app)
    class API:
        n = 3

        @traced
        @app.get("/n")
        def n_value(self) -> int:
            return self.n

    async def main() -> None:
        async with client(await ASGIIngress.create(API())) as c:
            assert (await c.get("/n")).json() == 3

    run(main())


# ---------------------------------------------------------------------------------------------
# Other kinds of app


def test_builder_function_is_called_in_the_replica() -> None:
    built: list = []

    def build() -> FastAPI:
        app = FastAPI(docs_url=None)

        @app.get("/ping")
        def ping() -> str:
            return "pong"
        built.append(app)
        return app

    @ingress(build)
    class Built:
        pass

    assert getattr(Built, ASGI_APP_ATTR) is build and not built  # lazy

    async def main() -> None:
        ing = await ASGIIngress.create(Built())
        assert built and ing.asgi_app is built[0] and ing.docs_path is None
        async with client(ing) as c:
            assert (await c.get("/ping")).json() == "pong"

    run(main())


def test_async_builder_function() -> None:
    async def build() -> Starlette:
        return Starlette(routes=[Route("/a", lambda request: PlainTextResponse("async-built"))])

    @ingress(build)
    class Built:
        pass

    async def main() -> None:
        async with client(await ASGIIngress.create(Built())) as c:
            assert (await c.get("/a")).text == "async-built"

    run(main())


def test_starlette_app() -> None:
    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("home")

    starlette_app = Starlette(routes=[Route("/", home)])

    @ingress(starlette_app)
    class Site:
        def __init__(self) -> None:
            self.greeting = "hello"

        async def greet(self, request: Any) -> JSONResponse:
            return JSONResponse({"greeting": self.greeting, "who": request.path_params["who"]})

    starlette_app.router.routes.append(Route("/greet/{who}", Site.greet))

    async def main() -> None:
        ing = await ASGIIngress.create(Site())
        assert ing.docs_path is None
        async with client(ing) as c:
            assert (await c.get("/")).text == "home"
            assert (await c.get("/greet/ann")).json() == {"greeting": "hello", "who": "ann"}

    run(main())


def test_raw_asgi_function_without_lifespan_support() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http", "no lifespan here"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"raw"})

    @ingress(app)
    class Raw:
        pass

    async def main() -> None:
        ing = await ASGIIngress.create(Raw())
        await ing.startup()  # treated as "no lifespan"
        async with client(ing) as c:
            assert (await c.get("/anything")).text == "raw"
        await ing.shutdown()

    run(main())


def test_api_router_is_served_in_a_fastapi_app() -> None:
    router = APIRouter(prefix="/v1")

    @ingress(router)
    class Versioned:
        def __init__(self, tag: str):
            self.tag = tag

        @router.get("/tag")
        def get_tag(self, upper: bool = False) -> str:
            return self.tag.upper() if upper else self.tag

    @router.get("/free")
    def free() -> str:
        return "free"

    async def main() -> None:
        a = await ASGIIngress.create(Versioned("a"))
        b = await ASGIIngress.create(Versioned("b"))
        assert isinstance(a.asgi_app, FastAPI) and a.docs_path == "/docs"
        async with client(a) as ca, client(b) as cb:
            assert (await ca.get("/v1/tag")).json() == "a"
            assert (await cb.get("/v1/tag", params={"upper": True})).json() == "B"
            assert (await ca.get("/v1/free")).json() == "free"
            params = (await ca.get("/openapi.json")).json()["paths"]["/v1/tag"]["get"]["parameters"]
            assert [p["name"] for p in params] == ["upper"]

    run(main())


def test_included_router_and_mounted_sub_app() -> None:
    app = FastAPI()
    router = APIRouter()
    sub = FastAPI()

    @ingress(app)
    class Composite:
        name = "composite"

        @router.get("/in-router")
        def in_router(self) -> str:
            return f"router:{self.name}"

        @sub.get("/in-sub")
        def in_sub(self) -> str:
            return f"sub:{self.name}"

    app.include_router(router, prefix="/r")
    app.mount("/sub", sub)

    async def main() -> None:
        async with client(await ASGIIngress.create(Composite())) as c:
            assert (await c.get("/r/in-router")).json() == "router:composite"
            assert (await c.get("/sub/in-sub")).json() == "sub:composite"

    run(main())


# ---------------------------------------------------------------------------------------------
# Lifespan


def lifespan_api(fail: Optional[str] = None) -> tuple[type, list]:
    events: list = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict]:
        events.append("startup")
        if fail == "startup":
            raise ValueError("database unreachable")
        yield {"connections": 3}
        events.append("shutdown")
        if fail == "shutdown":
            raise ValueError("could not flush")

    app = FastAPI(lifespan=lifespan)

    @ingress(app)
    class WithLifespan:
        @app.get("/state")
        def state(self, request: Request) -> int:
            return request.state.connections

    return WithLifespan, events


def test_lifespan_startup_and_shutdown_run_and_share_state() -> None:
    cls, events = lifespan_api()

    async def main() -> None:
        ing = await ASGIIngress.create(cls())
        await ing.startup()
        assert events == ["startup"]
        async with client(ing) as c:
            assert (await c.get("/state")).json() == 3
        await ing.shutdown()
        assert events == ["startup", "shutdown"]
        await ing.shutdown()  # a second shutdown does nothing
        assert events == ["startup", "shutdown"]

    run(main())


def test_failing_lifespan_startup_raises() -> None:
    cls, events = lifespan_api(fail="startup")

    async def main() -> None:
        ing = await ASGIIngress.create(cls())
        with pytest.raises(RuntimeError, match="database unreachable"):
            await ing.startup()
        await ing.shutdown()  # nothing started: no-op

    run(main())
    assert events == ["startup"]


def test_failing_lifespan_shutdown_raises() -> None:
    cls, events = lifespan_api(fail="shutdown")

    async def main() -> None:
        ing = await ASGIIngress.create(cls())
        await ing.startup()
        with pytest.raises(RuntimeError, match="could not flush"):
            await ing.shutdown()

    run(main())


# ---------------------------------------------------------------------------------------------
# Pickling


def fresh_copy(obj: Any) -> Any:
    """Pickle `obj`, let the original be collected, then unpickle: what a replica process would get.

    (cloudpickle hands back the original class when it still exists in this process.)
    """
    data = cloudpickle.dumps(obj)
    target = obj.func_or_class if isinstance(obj, Deployment) else obj
    ref = weakref.ref(target)
    del obj, target
    gc.collect()
    assert ref() is None, "the original is still alive: the copy would be the same object"
    return cloudpickle.loads(data)


async def serve_items(klass: type, prefix: str) -> None:
    ing = await ASGIIngress.create(klass(prefix))
    async with client(ing) as c:
        assert (await c.get("/hello", params={"name": "p"})).json() == {"msg": f"{prefix} p"}
        assert (await c.post("/items/1", json={"name": "n", "price": 1})).json()["name"] == f"{prefix}-n-1"
        assert (await c.get("/x/extra")).json() == "extra"
        assert (await c.get("/plain")).json() == {"plain": True}


def items_api_with_included_router() -> type:
    app, cls, _ = make_api()
    router = APIRouter()

    @router.get("/extra")
    def extra() -> str:
        return "extra"
    app.include_router(router, prefix="/x")
    return cls


def test_cloudpickle_round_trip_of_the_decorated_class() -> None:
    holder = [fresh_copy(items_api_with_included_router())]
    assert isinstance(getattr(holder[0], ASGI_APP_ATTR), FastAPI)
    run(serve_items(holder[0], "copy"))
    # Once served, the app's class routes are bound in place; it still travels and serves.
    again = fresh_copy(holder.pop())
    run(serve_items(again, "again"))


def test_cloudpickle_round_trip_of_a_deployment() -> None:
    copy = fresh_copy(serve.deployment(items_api_with_included_router()))
    assert isinstance(copy, Deployment) and is_ingress(copy)
    run(serve_items(copy.func_or_class, "deployment"))


# ---------------------------------------------------------------------------------------------
# The decorator


def test_stacks_under_serve_deployment() -> None:
    app = FastAPI()

    @serve.deployment(num_replicas=2)
    @serve_ingress(app)
    class MyAPI:
        @app.get("/")
        def root(self) -> str:
            return "root"

        def plain_method(self, x: int) -> int:
            return x + 1

    assert isinstance(MyAPI, Deployment) and MyAPI.num_replicas == 2
    assert is_ingress(MyAPI) and is_ingress(MyAPI.func_or_class) and is_ingress(MyAPI.func_or_class())
    assert getattr(MyAPI.func_or_class, ASGI_APP_ATTR) is app
    assert MyAPI.func_or_class().plain_method(1) == 2


def serve_ingress(app: Any) -> Any:
    """`serve.ingress` once the session exports it; this module's function until then."""
    return getattr(serve, "ingress", ingress)(app)


def test_is_ingress_false_for_plain_classes_and_functions() -> None:
    class Plain:
        pass

    def fn() -> None:
        pass

    assert not is_ingress(Plain) and not is_ingress(Plain()) and not is_ingress(fn)
    assert not is_ingress(serve.deployment(Plain))


def test_decorator_errors() -> None:
    app = FastAPI()

    with pytest.raises(TypeError, match="must decorate a class"):
        ingress(app)(lambda: None)
    with pytest.raises(TypeError, match="below @serve.deployment"):
        class Late:
            pass
        ingress(app)(serve.deployment(Late))
    with pytest.raises(ValueError, match=r"^Class passed to @serve.ingress may not have __call__ method\.$"):
        @ingress(app)
        class Callable_:
            def __call__(self) -> None:
                pass

    class Base:
        def __call__(self) -> None:
            pass

    with pytest.raises(ValueError, match="may not have __call__"):
        ingress(app)(type("Child", (Base,), {}))
    with pytest.raises(TypeError, match="expects a FastAPI app"):
        ingress(42)


def test_create_rejects_plain_instances_and_bad_builders() -> None:
    class Plain:
        pass

    @ingress(lambda: "not an app")
    class BadBuilder:
        pass

    async def main() -> None:
        with pytest.raises(TypeError, match="not decorated with @serve.ingress"):
            await ASGIIngress.create(Plain())
        with pytest.raises(TypeError, match="not an ASGI app"):
            await ASGIIngress.create(BadBuilder())

    run(main())
