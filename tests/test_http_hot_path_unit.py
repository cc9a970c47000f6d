"""Pieces of the proxy's hot path, tested directly: the scope's wire form, the reused pickler, and
the transport that joins one loop iteration's writes."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

from shoal.http.coalesce import CoalescingTransport, _Flusher
from shoal.http.scope import scope_from_wire, scope_to_wire
from shoal.transport.serialization import PlainPickler


def _uvicorn_scope(**over: Any) -> dict:
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 51234), "scheme": "http", "method": "PUT",
        "root_path": "/base", "path": "/base/app/x", "raw_path": b"/base/app/x", "query_string": b"a=1",
        "headers": [(b"host", b"h"), (b"x-a", b"1")], "state": {},
    }
    scope.update(over)
    return scope


def test_scope_survives_the_wire_with_the_route_prefix_in_root_path():
    wire = scope_to_wire(_uvicorn_scope(), "/app")
    scope = scope_from_wire(pickle.loads(pickle.dumps(wire)))
    assert scope == {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "scheme": "http", "method": "PUT", "path": "/base/app/x", "raw_path": b"/base/app/x",
        "query_string": b"a=1", "root_path": "/base/app", "headers": [(b"host", b"h"), (b"x-a", b"1")],
        "client": ("127.0.0.1", 51234), "server": ("127.0.0.1", 8000),
    }
    assert scope_from_wire(scope_to_wire(_uvicorn_scope(), "/"))["root_path"] == "/base"
    ws = scope_from_wire(scope_to_wire(_uvicorn_scope(type="websocket", subprotocols=["chat"]), "/app"))
    assert ws["type"] == "websocket" and ws["subprotocols"] == ["chat"] and "method" not in ws


def test_plain_pickler_output_stands_alone_after_reuse():
    p = PlainPickler()
    long = ("m", True, "model", "id-1", (("x" * 5000,), b"y" * 3000), {})
    short = ("m", False, "", "id-2", ((), b""), {})
    shared = ("s",)
    first = p.dumps(long)
    second = p.dumps(short)  # shorter than the previous value: nothing of it may remain
    third = p.dumps((shared, shared))
    assert pickle.loads(first) == long and pickle.loads(second) == short
    assert len(second) < 100  # (pickle.loads would ignore stale bytes after the end)
    assert pickle.loads(third) == (("s",), ("s",))


class _RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def writelines(self, lines: Any) -> None:
        self.writes.append(list(lines))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_reading(self) -> bool: return True
    def set_protocol(self, protocol: Any) -> None: ...
    def get_protocol(self) -> Any: return None
    def set_write_buffer_limits(self, high: Any = None, low: Any = None) -> None: ...
    def get_write_buffer_limits(self) -> tuple[int, int]: return (0, 0)
    def can_write_eof(self) -> bool: return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0


def test_coalescing_transport_joins_one_iteration_and_flushes_before_close():
    async def main() -> tuple[list[bytes], list[bytes], bool]:
        loop = asyncio.get_running_loop()
        raw = _RecordingTransport()
        t = CoalescingTransport(raw, _Flusher(loop))  # type: ignore[arg-type]
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"body")
        assert raw.writes == [] and t.get_write_buffer_size() == 23
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        joined = list(raw.writes)
        t.write(b"chunk 1")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        big = b"x" * (100 * 1024)
        t.write(b"head")
        t.write(big)  # a large body is not copied into one buffer with the head
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert raw.writes[-1] == [b"head", big] and raw.writes[-1][1] is big
        t.write(b"last")
        t.close()  # what is buffered goes out first
        assert t.get_extra_info("peername") == ("127.0.0.1", 1)
        return joined, raw.writes, raw.closed

    joined, writes, closed = asyncio.run(main())
    assert joined == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    assert writes[:2] == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"chunk 1"] and writes[3:] == [b"last"] and closed
