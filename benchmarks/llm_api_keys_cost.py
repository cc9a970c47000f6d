"""What API keys add to each request in the OpenAI ingress, in microseconds (CPU, one process).

Times the ingress's per-request key work outside the server, with 10 keys configured: reading
`Authorization` from the request's ASGI scope, the check (SHA-256 of the key, a dict lookup by digest,
`hmac.compare_digest`), counting the request, and charging the response's tokens (reading `usage`
from the body's end, two counter updates), first without limits, then with requests and tokens per
minute on. The rest of a request (HTTP, the model) is the same with or without keys.

    .venv/bin/python benchmarks/llm_api_keys_cost.py [rounds]
"""

from __future__ import annotations

import statistics
import sys
import time

from starlette.requests import Request

from shoal.llm.api_keys import KeyTable, ingress_auth, load_api_keys
from shoal.llm.ingress import _authorization
from shoal.llm.metrics import ApiKeyMetrics
from shoal.llm.protocol import dumps, usage_dict

N = 20_000
BODY = dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 40},
                           "logprobs": None, "finish_reason": "stop"}], "usage": usage_dict(25, 40)})


def request(key: str) -> Request:
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {key}".encode()), (b"user-agent", b"OpenAI/Python 2.0"),
               (b"accept", b"application/json")]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers})


def per_request_us(limits: bool) -> float:
    extra = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12} if limits else {}
    keys = [{"name": f"team-{i}", "key": f"sk-team-{i}-0123456789abcdef", **extra} for i in range(10)]
    table = KeyTable(ingress_auth(load_api_keys(keys)))
    metrics = ApiKeyMetrics()
    from shoal.llm.protocol import usage_of

    requests = [request(f"sk-team-{i % 10}-0123456789abcdef") for i in range(N)]
    start = time.perf_counter()
    for r in requests:  # what `OpenAiIngress._caller`, `admitted` and `_charge` do per request
        caller = table.check(_authorization(r.scope["headers"]))
        if caller.limits is not None and caller.limits.admit() is not None:
            raise RuntimeError("limited")
        metrics.admitted(caller.name, "m")
        prompt, completion = usage_of(BODY)
        metrics.used(caller.name, "m", prompt, completion)
        if caller.limits is not None:
            caller.limits.used(prompt + completion)
    return (time.perf_counter() - start) / N * 1e6


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for limits in (False, True):
        times = [per_request_us(limits) for _ in range(rounds)]
        print(f"10 keys, limits {'on ' if limits else 'off'}: median {statistics.median(times):.2f} us/request "
              f"(best {min(times):.2f}, {rounds} rounds of {N})")


if __name__ == "__main__":
    main()
