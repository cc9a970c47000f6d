"""The two baselines of the LLM benchmark, written the way a Ray Serve user would write them.

- `NaiveLLM`: a `transformers.pipeline("text-generation")` called once per request (the pattern of
  Ray Serve's "serve an LLM" tutorial), in float32, transformers' default.
- `BatchedLLM`: `model.generate` over a left-padded batch under `@serve.batch(max_batch_size=16)`:
  the batched deployment a skilled user writes, also float32.

Both generate exactly `max_tokens` new tokens greedily (`min_new_tokens` = `max_new_tokens`, as shoal's
side uses `ignore_eos`), and answer `{"text", "completion_tokens"}` over plain HTTP (POST JSON
`{"prompt", "max_tokens"}`); neither streams, so its time to first token is its whole latency.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from shoal import serve
from shoal.llm.models import local_model_dir

MODEL = "SmolLM2-135M-Instruct"


@serve.deployment
class NaiveLLM:
    def __init__(self) -> None:
        from transformers import pipeline

        self.pipe = pipeline("text-generation", model=str(local_model_dir(MODEL)), device="cpu")

    def __call__(self, request_body: dict) -> dict:
        n = int(request_body["max_tokens"])
        out = self.pipe(request_body["prompt"], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        return_full_text=False)
        return {"text": out[0]["generated_text"], "completion_tokens": n}


@serve.deployment(max_ongoing_requests=64)
class BatchedLLM:
    def __init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(local_model_dir(MODEL))
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate(self, bodies: list[dict]) -> list[dict]:
        n = max(int(b["max_tokens"]) for b in bodies)
        return await asyncio.to_thread(self._generate, [b["prompt"] for b in bodies], n)

    def _generate(self, prompts: list[str], n: int) -> list[dict]:
        import torch

        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [{"text": t, "completion_tokens": n} for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


@serve.deployment(max_ongoing_requests=64)
class HTTPFront:
    """Plain HTTP in front of a baseline: JSON in, JSON out."""

    def __init__(self, backend, method: str) -> None:
        self.backend = backend.options(method_name=method)

    async def __call__(self, request: Request) -> dict:
        return await self.backend.remote(await request.json())


naive_app = HTTPFront.bind(NaiveLLM.bind(), "__call__")
batched_app = HTTPFront.bind(BatchedLLM.bind(), "generate")
