"""The ASGI scope as it crosses from the proxy to a replica: a flat tuple of builtin values.

A tuple pickles and unpickles without a key string per field, and the proxy builds it without an
intermediate dict; the replica rebuilds the scope dict its ASGI app or Starlette `Request` expects.
Both ends use this module, so the field order lives in one place.
"""

from __future__ import annotations

from typing import Any

def scope_to_wire(scope: dict, prefix: str) -> tuple:
    """The plain-data part of uvicorn's scope (which has every key read here); the route prefix is
    appended to `root_path`."""
    t = scope["type"]
    return (
        t,
        scope["asgi"].get("spec_version", "2.3"),
        scope["http_version"],
        scope["method"] if t == "http" else scope.get("subprotocols", []),
        scope["scheme"],
        scope["path"],
        scope["raw_path"],
        scope["query_string"],
        scope["root_path"] + ("" if prefix == "/" else prefix),
        scope["headers"],
        scope["client"],
        scope["server"],
    )


def scope_from_wire(wire: tuple) -> dict[str, Any]:
    """The ASGI scope for the replica's app or Starlette `Request`."""
    t, spec, http_version, method_or_subprotocols, scheme, path, raw_path, query, root, headers, client, server = wire
    scope = {
        "type": t,
        "asgi": {"version": "3.0", "spec_version": spec},
        "http_version": http_version,
        "scheme": scheme,
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": root,
        "headers": headers,
        "client": client,
        "server": server,
    }
    if t == "http":
        scope["method"] = method_or_subprotocols
    else:
        scope["subprotocols"] = method_or_subprotocols
    return scope
