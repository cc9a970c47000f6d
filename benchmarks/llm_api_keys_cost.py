"""What API keys add to each request in the OpenAI ingress, in microseconds (CPU, one process).

Times the ingress's per-request key work outside the server, with 10 keys configured: reading
`Authorization` from the request's ASGI scope, the check (SHA-256 of the key, a dict lookup by digest,
`hmac.compare_digest`), counting the request, and charging the response's tokens (reading `usage`
from the body's end, two counter updates), first without limits, then with requests and tokens per
minute on. The rest of a request (HTTP, the model) is the same with or without keys.

With `--http`, the same through a real instance instead: two OpenAI ingresses in front of a stand-in
model that answers at once, one open and one with the 10 keys and limits, sent 500 sequential
`/v1/completions` requests at a time, alternated; the figure is the CPU time of all shoal processes
per request (psutil, 10 ms ticks, so only differences of tens of µs show).

    .venv/bin/python benchmarks/llm_api_keys_cost.py [rounds] [--http]
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
    table = KeyTable(ingress_auth(load_api_keys(keys_config(limits))))
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


def keys_config(limits: bool) -> list[dict]:
    extra = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12} if limits else {}
    return [{"name": f"team-{i}", "key": f"sk-team-{i}-0123456789abcdef", **extra} for i in range(10)]


class StandInServer:
    """Answers `/v1/models` and `/v1/completions` at once, so the ingress's work is what is measured."""

    def model_card(self) -> dict:
        return {"id": "m", "object": "model", "created": 1, "owned_by": "shoal"}

    async def completions(self, request: dict):
        yield BODY


def over_http(rounds: int) -> None:
    import httpx
    import psutil

    from shoal import serve
    from shoal.api import get_http_url
    from shoal.deployment import deployment
    from shoal.llm.ingress import OpenAiIngress

    serve.start(http_options={"port": 0})
    auth = ingress_auth(load_api_keys(keys_config(True)))
    ingress, model = deployment(OpenAiIngress), deployment(StandInServer)
    serve.run(ingress.options(name="open").bind({"m": model.options(name="m_open").bind()}),
              name="open", route_prefix="/open")
    serve.run(ingress.options(name="keyed").bind({"m": model.options(name="m_keyed").bind()}, auth),
              name="keyed", route_prefix="/keyed")
    base = get_http_url().rstrip("/")
    client = httpx.Client(timeout=30)
    body = {"model": "m", "prompt": "hi", "max_tokens": 1}
    headers = {"open": {}, "keyed": {"Authorization": "Bearer sk-team-3-0123456789abcdef"}}

    def cpu() -> float:
        total = 0.0
        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def run(app: str, n: int = 500) -> float:
        before = cpu()
        for _ in range(n):
            r = client.post(f"{base}/{app}/v1/completions", json=body, headers=headers[app])
            assert r.status_code == 200, r.text
        return (cpu() - before) / n * 1e6

    try:
        run("open", 200), run("keyed", 200)
        got: dict[str, list[float]] = {"open": [], "keyed": []}
        for _ in range(rounds):  # A-B-B-A, so drifting load hits both alike
            for app in ("open", "keyed", "keyed", "open"):
                got[app].append(run(app))
        for app, times in got.items():
            print(f"{app:5s}: median {statistics.median(times):.0f} us of CPU per request, all shoal processes "
                  f"({len(times)} runs of 500)")
    finally:
        serve.shutdown()


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--http"]
    rounds = int(args[0]) if args else 5
    if "--http" in sys.argv:
        over_http(rounds)
        return
    for limits in (False, True):
        times = [per_request_us(limits) for _ in range(rounds)]
        print(f"10 keys, limits {'on ' if limits else 'off'}: median {statistics.median(times):.2f} us/request "
              f"(best {min(times):.2f}, {rounds} rounds of {N})")


if __name__ == "__main__":
    main()
