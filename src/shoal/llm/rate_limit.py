"""Per-key request and token limits for the OpenAI server (`requests_per_minute`, `tokens_per_minute`).

Each limit is a token bucket: it holds up to a minute's allowance and refills continuously at
limit/60 per second, so a key may burst up to its limit and then goes at the limit's pace.

- Requests: each request takes 1 when it arrives; an empty bucket answers 429 at once.
- Tokens: a request's tokens (prompt + completion, from the response's usage; a stream's when it
  finishes) are charged after the fact and may overdraw the bucket. A key is admitted while its
  bucket is above zero, so one large request can pass the limit, and the next ones wait until the
  overdraft is paid back. A stream abandoned by its client or failing midway is not charged.

A 429 carries `Retry-After` (whole seconds until the bucket allows the request again).

The buckets live in each ingress replica, each with the limit divided by the number of ingress
replicas (`ingress_deployment_config`'s `num_replicas`, or the autoscaling minimum). The proxy spreads
requests over the replicas, so the total is close to the limit but approximate: a key whose
requests happen to land mostly on one replica is limited sooner.
"""

from __future__ import annotations

import math
import time
from typing import Optional

from .protocol import OpenAIError

_monotonic = time.monotonic


class Bucket:
    """A token bucket of `per_minute` (capacity at least 1), refilled at per_minute/60 per second."""

    __slots__ = ("rate", "capacity", "level", "stamp")

    def __init__(self, per_minute: float, now: Optional[float] = None) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, float(per_minute))
        self.level = self.capacity
        self.stamp = _monotonic() if now is None else now

    def _refill(self, now: float) -> float:
        level = self.level + max(0.0, now - self.stamp) * self.rate
        if level > self.capacity:
            level = self.capacity
        self.level = level
        self.stamp = now
        return level

    def take(self, amount: float, now: float) -> float:
        """Take `amount` if the bucket holds it: 0.0; otherwise nothing is taken and the answer is
        the seconds until it will hold it."""
        level = self._refill(now)
        if level >= amount:
            self.level = level - amount
            return 0.0
        return (amount - level) / self.rate

    def charge(self, amount: float, now: float) -> None:
        """Take `amount` after the fact; the bucket may go below zero."""
        self.level = self._refill(now) - amount

    def wait_positive(self, now: float) -> float:
        """0.0 while the bucket is above zero, else the seconds until it is."""
        level = self._refill(now)
        return 0.0 if level > 0 else (-level) / self.rate + 1e-3


class KeyLimits:
    """The limits of one key in this ingress replica (each limit divided by `replicas`)."""

    __slots__ = ("name", "rpm", "tpm", "requests", "tokens")

    def __init__(self, name: str, requests_per_minute: Optional[int], tokens_per_minute: Optional[int],
                 replicas: int = 1, now: Optional[float] = None) -> None:
        self.name = name
        self.rpm = requests_per_minute
        self.tpm = tokens_per_minute
        replicas = max(1, replicas)
        self.requests = Bucket(requests_per_minute / replicas, now) if requests_per_minute else None
        self.tokens = Bucket(tokens_per_minute / replicas, now) if tokens_per_minute else None

    def admit(self, now: Optional[float] = None) -> Optional[OpenAIError]:
        """None if a request may go now (its request is counted); else the 429 to answer."""
        if now is None:
            now = _monotonic()
        if self.tokens is not None:
            wait = self.tokens.wait_positive(now)
            if wait:
                return self._refusal("tokens", "tokens per min (TPM)", self.tpm, wait)
        if self.requests is not None:
            wait = self.requests.take(1.0, now)
            if wait:
                return self._refusal("requests", "requests per min (RPM)", self.rpm, wait)
        return None

    def used(self, tokens: int, now: Optional[float] = None) -> None:
        """Charge the tokens a finished request used."""
        if self.tokens is not None and tokens:
            self.tokens.charge(float(tokens), _monotonic() if now is None else now)

    def _refusal(self, kind: str, what: str, limit: Optional[int], wait: float) -> OpenAIError:
        seconds = max(1, math.ceil(wait))
        exc = OpenAIError(
            429, f"Rate limit reached for API key '{self.name}' on {what}: Limit {limit}. "
                 f"Please try again in {seconds}s.",
            type=kind, code="rate_limit_exceeded",
        )
        exc.retry_after = seconds  # type: ignore[attr-defined] - read by the ingress for `Retry-After`
        exc.reason = f"{kind}_per_minute"  # type: ignore[attr-defined] - the rejections metric's label
        return exc
