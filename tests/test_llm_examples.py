"""The three LLM examples run as they stand, on the bundled models, over real HTTP."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import require_llm_stack, wait_for  # noqa: E402

require_llm_stack()

from shoal import serve  # noqa: E402
from shoal.api import get_http_url  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _running_replicas(app: str, deployment: str) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return sum(n for state, n in status.replica_states.items() if getattr(state, "value", state) == "RUNNING")


def test_llm_pipeline_example_four_replicas_share_the_cpus(serve_app):
    from examples.llm_pipeline import app

    serve.run(app, name="pipeline")
    assert _running_replicas("pipeline", "LLM") == 4  # 4 x 0.5 CPU fit the 2 CPUs the runtime has

    def ask(i: int) -> httpx.Response:
        return httpx.get(get_http_url() + "/", params={"prompt": f"Fact number {i} about the sea:"}, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, range(8)))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert all(r.json()["completion"].strip() for r in replies)
    missing = httpx.get(get_http_url() + "/", timeout=30)
    assert missing.status_code == 400 and "prompt" in missing.json()["error"]


def test_rag_example_answers_from_retrieved_documents(serve_app):
    from examples.rag import app

    serve.run(app, name="rag")
    url = get_http_url() + "/"
    r = httpx.get(url, params={"question": "What is the capital of Veloria?"}, timeout=120)
    assert r.status_code == 200
    body = r.json()
    assert "Quellton" in body["sources"][0] and "capital" in body["sources"][0]
    assert "Quellton" in body["answer"]  # the model could not know it without the retrieved passage
    r = httpx.get(url, params={"question": "When was the Quellton lighthouse built?"}, timeout=120)
    assert "lighthouse" in r.json()["sources"][0] and "1702" in r.json()["answer"]
    with httpx.stream("GET", url, params={"question": "What is the national dish?", "stream": "true"},
                      timeout=120) as streamed:
        pieces = list(streamed.iter_text())
    assert len(pieces) > 3 and "silverfin" in "".join(pieces)
    assert httpx.get(url, timeout=30).status_code == 400


def test_autoscaling_llm_example_scales_up_under_load(serve_app):
    import openai

    from examples.llm_autoscaling import app

    serve.run(app, name="autoscale")
    deployment = "LLMServer:SmolLM2-135M-Instruct"
    assert _running_replicas("autoscale", deployment) == 1
    client = openai.AsyncOpenAI(base_url=get_http_url() + "/v1", api_key="unused", max_retries=0, timeout=300)
    scaled: list[int] = []

    async def stream(i: int) -> int:
        chunks = await client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=f"Story {i}:", max_tokens=400, stream=True,
            extra_body={"ignore_eos": True},
        )
        n = 0
        async with chunks:  # closing the stream on `break` aborts its generation and frees the slot
            async for _ in chunks:
                n += 1
                if scaled:
                    break  # the point is made; stop early
        return n

    async def load() -> None:
        tasks = [asyncio.create_task(stream(i)) for i in range(12)]  # 12 streams > 4 per replica
        await asyncio.to_thread(
            wait_for, lambda: _running_replicas("autoscale", deployment) >= 2, 180, 0.5, "a second replica")
        scaled.append(1)
        await asyncio.gather(*tasks)

    asyncio.run(load())
    assert _running_replicas("autoscale", deployment) == 2
