"""What a plain deployment returns, as an HTTP response (Ray Serve's conversion rules).

`None` -> empty text/plain; `str` -> text/plain UTF-8; `bytes` -> text/plain; anything else ->
compact JSON. Starlette `Response` objects (streaming included) are run as ASGI apps instead, and
generators are streamed: for both `to_http` returns None.
"""

from __future__ import annotations

import json
from types import AsyncGeneratorType, GeneratorType
from typing import Any, Optional

TEXT_UTF8 = [(b"content-type", b"text/plain; charset=utf-8")]
TEXT = [(b"content-type", b"text/plain")]
JSON = [(b"content-type", b"application/json")]


def _json_bytes(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        from fastapi.encoders import jsonable_encoder  # pydantic models, dataclasses, datetimes...

        return json.dumps(jsonable_encoder(value), separators=(",", ":")).encode()


def to_http(value: Any) -> Optional[tuple[int, list, bytes]]:
    """`(status, headers, body)` for a plain value; None when `value` is an ASGI response to run or a
    generator to stream."""
    t = type(value)
    if t is str:
        body = value.encode()
        return 200, TEXT_UTF8 + [(b"content-length", str(len(body)).encode())], body
    if t is bytes:
        return 200, TEXT + [(b"content-length", str(len(value)).encode())], value
    if value is None:
        return 200, TEXT + [(b"content-length", b"0")], b""
    if t is GeneratorType or t is AsyncGeneratorType or _is_asgi_response(value):
        return None
    body = _json_bytes(value)
    return 200, JSON + [(b"content-length", str(len(body)).encode())], body


def _is_asgi_response(value: Any) -> bool:
    try:
        from starlette.responses import Response
    except ImportError:  # pragma: no cover - starlette is a dependency
        return False
    return isinstance(value, Response)


def chunk_bytes(item: Any) -> bytes:
    """One streamed item from a generator, as bytes."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return _json_bytes(item)
