"""One side of the LLM benchmark: deploy it, load it at 1, 4 and 16 concurrent streams, print RESULT.

Sides: `shoal` (`build_openai_app` on the default model with default engine options, streaming
`/v1/completions` with `ignore_eos`), `llama-server` (llama.cpp's own server on the same GGUF file,
same requests, built by ensure_llama_server.sh), `naive` and `batched` (llm_baselines.py). Every request asks
for exactly `--tokens` new tokens on its own prompt. At concurrency C, C client tasks each send
`--requests-per-client` requests back to back (before the first level, one uncounted warm-up
request per client); tokens/s is all generated tokens over the wall time of the measured rounds, and time to first
token runs from sending a request to its first token (the whole response for sides that do not
stream). With `--memory`, the side also serves the embedding model and reports the RSS of every
shoal process (controller, proxy, replicas) after the load: the LLM alone (`memory_mb`, the figure
compared with llama-server's), then with the embedding model added (`memory_both_mb`). `first_answer_s`
runs from the start of the server (shoal's `serve.start`, llama-server's exec) to the first answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shoal import serve  # noqa: E402
from shoal.api import get_http_url  # noqa: E402

TOPICS = ["a lighthouse", "a dragon", "the sea", "a robot", "a garden", "a train", "the moon", "a city",
          "a violin", "a storm", "a library", "a fox", "a bridge", "a comet", "a bakery", "a glacier"]


def prompt(i: int) -> str:
    return f"Here is a short story about {TOPICS[i % len(TOPICS)]}, number {i}:"


#: `--response-format`: sent with every shoal request (structured output; see llm_bench.py --structured).
RESPONSE_FORMAT: dict | None = None


async def shoal_request(client: httpx.AsyncClient, url: str, i: int, tokens: int) -> tuple[float, int]:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt(i), "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if RESPONSE_FORMAT is not None:
        body["response_format"] = RESPONSE_FORMAT
    start = time.perf_counter()
    for attempt in (1, 2):
        ttft, completion = None, 0
        try:
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if ttft is None and event["choices"] and event["choices"][0]["text"]:
                        ttft = time.perf_counter() - start
                    if event.get("usage"):
                        completion = event["usage"]["completion_tokens"]
        except httpx.RemoteProtocolError:
            # A kept-alive connection the server had closed (llama-server's HTTP library closes one
            # after a few requests without saying so): sent again once on a new connection, as
            # browsers do. The time lost counts against the request.
            if attempt == 2 or ttft is not None:
                raise
            continue
        break
    return (ttft if ttft is not None else time.perf_counter() - start), completion


async def baseline_request(client: httpx.AsyncClient, url: str, i: int, tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = await client.post(url + "/", json={"prompt": prompt(i), "max_tokens": tokens})
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["completion_tokens"]


async def level(send, url: str, concurrency: int, per_client: int, tokens: int, warmup: bool) -> dict:
    """Warm up (one request per client) if asked, then measure `per_client` requests per client."""
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=64)) as client:
        if warmup:
            await asyncio.gather(*(send(client, url, 1000 + c, tokens) for c in range(concurrency)))
        ttfts: list[float] = []
        total = 0

        async def worker(c: int) -> None:
            nonlocal total
            for k in range(per_client):
                ttft, n = await send(client, url, c * per_client + k, tokens)
                ttfts.append(ttft)
                total += n

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts.sort()
    return {"concurrency": concurrency, "tokens_per_s": total / wall, "requests": len(ttfts),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "wall_s": wall}


HERE = Path(__file__).resolve().parent
LLM_ID = "SmolLM2-135M-Instruct"
EMBEDDING_ID = "all-MiniLM-L6-v2"


def first_answer(url: str, server: subprocess.Popen | None = None, deadline_s: float = 600.0) -> None:
    """Poll until the server gives one real completion (a health check is not an answer)."""
    body = {"model": LLM_ID, "prompt": "Hi", "max_tokens": 1}
    end = time.monotonic() + deadline_s
    while True:
        try:
            if httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server is not None and server.poll() is not None:
            raise SystemExit(f"llama-server exited with code {server.returncode} before answering")
        if time.monotonic() > end:
            raise SystemExit(f"no answer from {url} within {deadline_s:.0f} s")
        time.sleep(0.05)


def start_llama_server(port: int = 18777, amx_fix: bool = False) -> subprocess.Popen:
    """llama.cpp's server on the bundled GGUF: every core, 16 slots of 512 tokens, the model's name,
    and the llama.cpp engine's defaults where they differ from the server's: flash attention off.
    As built by default (`amx_fix` False), ggml's AMX matmul faults on CPUs with AMX (GCC 12 drops
    its tile configuration's stores), so there it runs without repacked weights (`--no-repack`);
    `amx_fix` builds it with the flags shoal's `make install` gives llama.cpp and keeps repacking on."""
    from shoal.llm.engines.llama_amx import cpu_has_amx
    from shoal.llm.models import resolve_model_source

    ensure = ["bash", str(HERE / "ensure_llama_server.sh"), *(["--amx-fix"] if amx_fix else [])]
    binary = subprocess.run(ensure, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    gguf = resolve_model_source(LLM_ID).path
    threads = str(os.cpu_count() or 1)
    return subprocess.Popen([binary, "-m", str(gguf), "-a", LLM_ID, "--host", "127.0.0.1", "--port", str(port),
                             "-t", threads, "-tb", threads, "--parallel", "16", "-c", str(16 * 512),
                             "--no-webui", "--log-disable", "--flash-attn", "off",
                             *(["--no-repack"] if cpu_has_amx() and not amx_fix else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shoal_memory_mb() -> float:
    """RSS of every process of this shoal instance (this driver's children), in MiB."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in me.children(recursive=True)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["shoal", "llama-server", "llama-server-amx-fix", "naive", "batched"],
                    required=True)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--response-format", default=None, help="JSON of a response_format for the shoal side")
    ap.add_argument("--engine", default=None, help="the shoal side's engine (llama_cpp, transformers); default: auto")
    a = ap.parse_args()
    global RESPONSE_FORMAT
    RESPONSE_FORMAT = json.loads(a.response_format) if a.response_format else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    server = None
    if a.side.startswith("llama-server"):
        server = start_llama_server(amx_fix=a.side == "llama-server-amx-fix")
        url, send = "http://127.0.0.1:18777", shoal_request
    else:
        serve.start(http_options={"port": 0})
        if a.side == "shoal":
            from shoal.llm import build_openai_app

            config = {"model_loading_config": {"model_id": LLM_ID}}
            if a.engine:
                config["engine_kwargs"] = {"engine": a.engine}
            serve.run(build_openai_app({"llm_configs": [config]}))
            send = shoal_request
        else:
            import llm_baselines

            serve.run(llm_baselines.naive_app if a.side == "naive" else llm_baselines.batched_app)
            send = baseline_request
        url = get_http_url().rstrip("/")
    ready_s = time.perf_counter() - t0
    result: dict = {"side": a.side, "ready_s": ready_s}
    if send is shoal_request:
        first_answer(url, server)
        result["first_answer_s"] = time.perf_counter() - t0
    levels = []
    try:
        for c in (int(x) for x in a.levels.split(",")):
            # The naive side serves one request at a time: one request per client keeps its run short.
            per_client = 1 if (a.side == "naive" and c > 1) else a.requests_per_client
            levels.append(asyncio.run(level(send, url, c, per_client, a.tokens, warmup=not levels)))
            print(f"{a.side} c={c}: {levels[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
        result["levels"] = levels
        if a.memory and server is not None:
            result["memory_mb"] = psutil.Process(server.pid).memory_info().rss / 2**20
        elif a.memory:
            result["memory_mb"] = shoal_memory_mb()
            if a.side == "shoal":
                from shoal.llm import build_openai_app

                embedding = {"llm_configs": [{"model_loading_config": {"model_id": EMBEDDING_ID}}]}
                serve.run(build_openai_app(embedding), name="embeddings", route_prefix="/embeddings")
                result["memory_both_mb"] = shoal_memory_mb()
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        else:
            serve.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
