"""How a browser gets into the dashboard: a one-time login code, then a session cookie.

The admin API's bearer token is long-lived and grants everything (deploy, shut down); it should
not travel in a URL or sit in a browser's history. So `shoal dashboard` asks the admin API (with
the token) for a login code, valid once and for `CODE_TTL_S`, and opens
`/dashboard/login?code=...`. That answer sets a session cookie and redirects to `/dashboard`.

The cookie grants reading only: the admin API accepts it for GET requests under `/dashboard/`
(the page, its files, its snapshot), never for a route that changes anything (those keep requiring
the `Authorization` header, which a browser never sends by itself, so there is no CSRF). It is
HttpOnly, SameSite=Strict and limited to `Path=/dashboard` (cookies are not kept apart by port: the
path keeps it from being sent to applications served on other ports of 127.0.0.1), and named after
the admin port, so two instances' dashboards in one browser do not log each other out.

The session value is `expiry.HMAC(key, expiry)` with a key derived from the instance's token, so
it needs no server state and survives a controller restart; it ends after `SESSION_TTL_S` or when
the token changes (a new `shoal start`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Optional

CODE_TTL_S = 300.0
SESSION_TTL_S = 12 * 3600
COOKIE_PATH = "/dashboard"
_MAX_CODES = 64  # outstanding codes; the oldest go first


class DashboardAuth:
    def __init__(self, token: str, port: int) -> None:
        self._key = hashlib.sha256(b"shoal-dashboard-session\0" + token.encode()).digest()
        self.cookie_name = f"shoal_dashboard_{port}"
        self._codes: dict[str, float] = {}  # code -> expiry (monotonic)

    # --- login codes ------------------------------------------------------------------------------
    def new_code(self) -> str:
        now = time.monotonic()
        self._codes = {c: t for c, t in self._codes.items() if t > now}
        while len(self._codes) >= _MAX_CODES:
            self._codes.pop(next(iter(self._codes)))
        code = secrets.token_urlsafe(24)
        self._codes[code] = now + CODE_TTL_S
        return code

    def redeem(self, code: str) -> Optional[str]:
        """A new session value for a valid, unused code (which is then used up); None otherwise."""
        expiry = self._codes.pop(code, None)
        if expiry is None or expiry < time.monotonic():
            return None
        return self._session(int(time.time()) + SESSION_TTL_S)

    # --- sessions ---------------------------------------------------------------------------------
    def _session(self, expiry: int) -> str:
        mac = hmac.new(self._key, str(expiry).encode(), hashlib.sha256).hexdigest()
        return f"{expiry}.{mac}"

    def valid(self, value: str) -> bool:
        expiry, _, mac = value.partition(".")
        if not expiry.isdigit() or int(expiry) < time.time():
            return False
        return secrets.compare_digest(self._session(int(expiry)), value)

    def set_cookie(self, value: str) -> str:
        return (f"{self.cookie_name}={value}; Max-Age={SESSION_TTL_S}; Path={COOKIE_PATH}; HttpOnly; "
                "SameSite=Strict")

    def session_of(self, cookie_header: str) -> Optional[str]:
        """This instance's session value among the cookies a request carries."""
        for part in cookie_header.split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie_name:
                return value
        return None


def readable_with_cookie(method: str, path: str) -> bool:
    """Routes a session cookie opens: reading the dashboard, nothing else."""
    return method in ("GET", "HEAD") and (path == COOKIE_PATH or path.startswith(COOKIE_PATH + "/"))
