"""`@serve.ingress` with FastAPI over the real proxy: class-based routes, lifespan, WebSockets, handles."""

from __future__ import annotations

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, WebSocket
from pydantic import BaseModel

from shoal import serve
from shoal.api import get_http_url

app = FastAPI()
events: list = []


class Item(BaseModel):
    name: str
    price: float


def page_size(size: int = 10) -> int:
    return size


@serve.deployment
@serve.ingress(app)
class Shop:
    def __init__(self, currency: str):
        self.currency = currency

    @app.get("/items/{item_id}")
    def read(self, item_id: int, size: int = Depends(page_size)):
        if item_id == 404:
            raise HTTPException(status_code=404, detail="no such item")
        return {"id": item_id, "currency": self.currency, "size": size}

    @app.post("/items")
    async def create(self, item: Item):
        return {"name": item.name, "price": f"{item.price:.2f} {self.currency}"}

    @app.websocket("/ws")
    async def echo(self, websocket: WebSocket):
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            if text == "bye":
                await websocket.close()
                return
            await websocket.send_text(f"{self.currency}:{text}")

    def convert(self, amount: float) -> str:
        return f"{amount} {self.currency}"


@pytest.fixture
def url(serve_app) -> str:
    return get_http_url()


def test_class_based_routes_see_self(url):
    serve.run(Shop.bind("EUR"), route_prefix="/shop")
    r = httpx.get(url + "/shop/items/7", params={"size": 3})
    assert r.status_code == 200 and r.json() == {"id": 7, "currency": "EUR", "size": 3}
    r = httpx.post(url + "/shop/items", json={"name": "pen", "price": 1.5})
    assert r.json() == {"name": "pen", "price": "1.50 EUR"}
    r = httpx.get(url + "/shop/items/404")
    assert r.status_code == 404 and r.json() == {"detail": "no such item"}
    r = httpx.get(url + "/shop/items/not-a-number")
    assert r.status_code == 422
    assert httpx.get(url + "/shop/openapi.json").status_code == 200


def test_methods_stay_callable_through_handles(url):
    h = serve.run(Shop.bind("USD"), route_prefix="/shop")
    assert h.convert.remote(3).result() == "3 USD"


def test_websocket_through_the_proxy(url):
    from websockets.sync.client import connect

    serve.run(Shop.bind("GBP"), route_prefix="/shop")
    with connect(url.replace("http://", "ws://") + "/shop/ws") as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "GBP:hello"
        ws.send("again")
        assert ws.recv(timeout=10) == "GBP:again"
        ws.send("bye")


def test_lifespan_runs_in_the_replica(url, tmp_path):
    from contextlib import asynccontextmanager

    marker = tmp_path / "lifespan"

    @asynccontextmanager
    async def lifespan(_app):
        marker.write_text("started")
        yield
        marker.write_text("stopped")

    life_app = FastAPI(lifespan=lifespan)

    @serve.deployment
    @serve.ingress(life_app)
    class Life:
        @life_app.get("/")
        def root(self):
            return "alive"

    serve.run(Life.bind(), name="life", route_prefix="/life")
    assert httpx.get(url + "/life/").json() == "alive"
    assert marker.read_text() == "started"
    serve.delete("life")
    assert marker.read_text() == "stopped"
