"""API keys for the OpenAI server: which keys exist (config), and checking a request's key (ingress).

Keys come from `api_keys` in `LLMServingArgs` (an app's config), from `shoal llm serve --api-key`
(repeatable) or from `SHOAL_API_KEY` (a comma-separated list). A key in a config file can name an
environment variable instead of holding the secret (`key_env`), so the file can be committed.

The key text stays in the process that builds the application: what reaches the ingress replica
(its init arguments, hence the deployment's config, status and checkpoints) is each key's name,
its limits and the SHA-256 digest of the key. A request's `Authorization: Bearer <key>` is hashed
and looked up by digest, then the digests are compared with `hmac.compare_digest`; no key text is
logged anywhere, and metrics and log lines name a key by its `name`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from .protocol import OpenAIError

#: The environment variable `shoal llm serve` reads keys from (comma-separated).
ENV_VAR = "SHOAL_API_KEY"


class ApiKeyConfig(BaseModel):
    """One API key: its `name` (for metrics and logs), the key itself or the environment variable
    that holds it, and optional per-minute limits."""

    # A validation error must not echo the key (the input) back into a log or a terminal.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")
    key: Optional[SecretStr] = None  # SecretStr: repr, str and model_dump never show the text
    key_env: Optional[str] = Field(None, min_length=1)
    requests_per_minute: Optional[int] = Field(None, ge=1)
    tokens_per_minute: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "ApiKeyConfig":
        if (self.key is None) == (self.key_env is None):
            raise ValueError(f"API key {self.name!r}: give exactly one of `key` and `key_env`")
        if self.key is not None and not self.key.get_secret_value().strip():
            raise ValueError(f"API key {self.name!r}: the key is empty")
        return self

    def secret(self) -> str:
        """The key text (read from `key_env` now, in the process that builds the app)."""
        if self.key is not None:
            return self.key.get_secret_value()
        value = os.environ.get(self.key_env or "", "").strip()
        if not value:
            raise ValueError(f"API key {self.name!r}: environment variable {self.key_env} is not set or empty")
        return value

    def for_ingress(self) -> dict[str, Any]:
        """What the ingress replica gets: name, limits and the key's digest, never the key."""
        return {"name": self.name, "sha256": digest(self.secret()).hex(),
                "requests_per_minute": self.requests_per_minute, "tokens_per_minute": self.tokens_per_minute}


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_api_keys(items: Iterable[Union[ApiKeyConfig, str, dict[str, Any]]]) -> list[ApiKeyConfig]:
    """`ApiKeyConfig`s from configs, dicts or bare key strings (named `key-1`, `key-2`, ... by position)."""
    keys: list[ApiKeyConfig] = []
    for i, item in enumerate(items, 1):
        if isinstance(item, str):
            item = {"name": f"key-{i}", "key": item}
        keys.append(item if isinstance(item, ApiKeyConfig) else ApiKeyConfig.model_validate(item))
    names = [k.name for k in keys]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"API key name {name!r} appears twice")
    return keys


def keys_from_env(environ: Optional[dict[str, str]] = None) -> list[str]:
    """The keys listed in `SHOAL_API_KEY` (comma-separated, blanks ignored)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return [part.strip() for part in value.split(",") if part.strip()]


def ingress_auth(keys: list[ApiKeyConfig], ingress_replicas: int = 1) -> Optional[dict[str, Any]]:
    """The ingress's `auth` argument for `keys` (None when there are none: the API is open)."""
    if not keys:
        return None
    entries = [k.for_ingress() for k in keys]
    seen: dict[str, str] = {}
    for entry in entries:
        other = seen.setdefault(entry["sha256"], entry["name"])
        if other != entry["name"]:
            raise ValueError(f"API keys {other!r} and {entry['name']!r} are the same key")
    return {"keys": entries, "ingress_replicas": max(1, int(ingress_replicas))}


# -- the ingress side ---------------------------------------------------------------------------------

_MISSING = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")


def missing_key() -> OpenAIError:
    exc = OpenAIError(401, _MISSING, code="invalid_api_key")
    exc.reason = "missing_key"  # type: ignore[attr-defined] - the rejections metric's label
    return exc


def incorrect_key(given: str) -> OpenAIError:
    """OpenAI's words; the key is shown masked (as OpenAI does), only to the caller who sent it."""
    shown = f"{given[:3]}{'*' * 4}{given[-4:]}" if len(given) >= 16 else "*" * 4
    exc = OpenAIError(401, f"Incorrect API key provided: {shown}. Ask the server's operator for a valid key.",
                      code="invalid_api_key")
    exc.reason = "invalid_key"  # type: ignore[attr-defined]
    return exc


class Caller:
    """A known key, as the ingress sees it: its name, metric labels and limiter (None: no limits)."""

    __slots__ = ("name", "sha256", "limits")

    def __init__(self, name: str, sha256: bytes, limits: Any) -> None:
        self.name = name
        self.sha256 = sha256
        self.limits = limits


class KeyTable:
    """The ingress's keys by digest. `check(header)` returns the caller or raises a 401."""

    def __init__(self, auth: dict[str, Any]) -> None:
        from .rate_limit import KeyLimits

        replicas = max(1, int(auth.get("ingress_replicas") or 1))
        self.callers: dict[bytes, Caller] = {}
        for entry in auth["keys"]:
            rpm, tpm = entry.get("requests_per_minute"), entry.get("tokens_per_minute")
            limits = KeyLimits(entry["name"], rpm, tpm, replicas) if (rpm or tpm) else None
            sha = bytes.fromhex(entry["sha256"])
            self.callers[sha] = Caller(entry["name"], sha, limits)

    def check(self, header: Optional[str]) -> Caller:
        """The caller whose key `header` (an `Authorization` value) carries; 401 when none does."""
        if not header:
            raise missing_key()
        scheme, _, given = header.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise missing_key()
        sha = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
        caller = self.callers.get(sha)
        # The lookup is on the digest (an attacker cannot steer it); the comparison is constant-time.
        if caller is None or not hmac.compare_digest(caller.sha256, sha):
            raise incorrect_key(given)
        return caller
