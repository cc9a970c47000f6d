"""Longest-prefix matching of request paths to applications (Ray Serve's rule).

`/a` matches `/a`, `/a/` and `/a/b`, never `/ab`; `/` matches everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Route:
    prefix: str
    app_name: str
    ingress: str


class RouteTable:
    def __init__(self, routes: list[Route] = ()):  # type: ignore[assignment]
        # Longest first, so the first match is the most specific one.
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._cache: dict[str, Optional[Route]] = {}

    def match(self, path: str) -> Optional[Route]:
        cached = self._cache.get(path, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        found = None
        for r in self.routes:
            p = r.prefix
            if p == "/" or path == p or (path.startswith(p) and (p.endswith("/") or path[len(p)] == "/")):
                found = r
                break
        if len(self._cache) < 10_000:
            self._cache[path] = found
        return found

    def as_dict(self) -> dict[str, str]:
        """`{route_prefix: app_name}`, as `GET /-/routes` shows it."""
        return {r.prefix: r.app_name for r in sorted(self.routes, key=lambda r: r.prefix)}
