"""An LLM behind HTTP the simple way: `transformers.pipeline("text-generation")` in 4 replicas.

The four replicas share the machine's CPUs (half a CPU each, one torch thread each), and the
proxy spreads requests over them. Run it with `shoal run examples.llm_pipeline:app`, then:

    curl 'http://127.0.0.1:8000/?prompt=Once+upon+a+time'

This is the "naive" way of serving a model (one request at a time per replica); `shoal llm serve`
batches requests continuously and is several times faster under load (see benchmarks/llm_bench.py).
The same file runs on Ray Serve by changing the shoal imports.
"""

from starlette.requests import Request
from starlette.responses import JSONResponse

from shoal import serve
from shoal.llm.models import local_model_dir

MODEL = "SmolLM2-135M-Instruct"  # bundled with shoal; any local model directory works too


@serve.deployment(num_replicas=4, ray_actor_options={"num_cpus": 0.5})
class LLM:
    def __init__(self, max_new_tokens: int = 32) -> None:
        import torch
        from transformers import pipeline

        torch.set_num_threads(1)  # four replicas share the cores: one thread each
        self.max_new_tokens = max_new_tokens
        self.pipe = pipeline("text-generation", model=str(local_model_dir(MODEL)), device="cpu")

    def __call__(self, request: Request) -> JSONResponse:
        prompt = request.query_params.get("prompt")
        if not prompt:
            return JSONResponse({"error": "add a prompt: /?prompt=..."}, status_code=400)
        out = self.pipe(prompt, max_new_tokens=self.max_new_tokens, do_sample=False, return_full_text=False)
        return JSONResponse({"prompt": prompt, "completion": out[0]["generated_text"]})


app = LLM.bind()
