"""LoRA adapters through multiplexing (`lora_config`), with the official `openai` client against a real
server: two replicas of the bundled model on the llama.cpp engine, adapters this module writes itself
(random low-rank weights for a few of the model's projections, saved as GGUF LoRA files)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import require_llm_stack, wait_for  # noqa: E402

require_llm_stack()

import openai  # noqa: E402

from shoal import serve  # noqa: E402
from shoal.api import get_http_url  # noqa: E402
from shoal.llm import LLMConfig, build_openai_app  # noqa: E402
from lora_adapters import write_lora  # noqa: E402

CHAT = "SmolLM2-135M-Instruct"
APP = "lora"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    for i, name in enumerate(("pirate", "poet", "chef")):
        (root / name).mkdir()
        write_lora(str(root / name / "adapter.gguf"), seed=i)
    (root / "broken").mkdir()
    (root / "broken" / "adapter.gguf").write_bytes(b"not a gguf file")
    return root


@pytest.fixture(scope="module")
def client(serve_instance, adapters_dir):
    chat = LLMConfig(
        model_loading_config={"model_id": CHAT},
        engine_kwargs={"max_num_seqs": 8, "num_threads": 1},
        deployment_config={"num_replicas": 2},
        lora_config={"dynamic_lora_loading_path": str(adapters_dir), "max_num_adapters_per_replica": 2},
    )
    serve.run(build_openai_app({"llm_configs": [chat]}), name=APP)
    yield openai.OpenAI(base_url=get_http_url().rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete(APP)


def complete(client, model: str, prompt: str = "The sea is") -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def _stats() -> dict[str, dict]:
    """Each replica's engine stats (called until both replicas answered)."""
    handle = serve.get_deployment_handle(f"LLMServer:{CHAT.replace('.', '_')}", APP)
    seen: dict[str, dict] = {}
    for _ in range(60):
        stats = handle.engine_stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            break
    return seen


def test_adapter_changes_the_output_and_is_deterministic(client):
    base = complete(client, CHAT)
    pirate = complete(client, f"{CHAT}:pirate")
    poet = complete(client, f"{CHAT}:poet")
    assert pirate != base and poet != base and pirate != poet
    assert complete(client, f"{CHAT}:pirate") == pirate  # the same adapter, the same greedy text
    assert complete(client, CHAT) == base  # the base model is untouched by the adapters
    chat = client.chat.completions.create(model=f"{CHAT}:poet", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.model == f"{CHAT}:poet" and chat.choices[0].message.content is not None


def test_requests_for_an_adapter_stick_to_the_replica_that_loaded_it(client):
    before = sum(s["lora_adapter_loads"] for s in _stats().values())
    complete(client, f"{CHAT}:chef")
    for _ in range(12):
        complete(client, f"{CHAT}:chef", prompt="Soup is")
    holders = wait_for(lambda: [r for r, s in _stats().items() if "chef" in s["lora_adapters"]] or None,
                       timeout=30, what="a replica to report the chef adapter")
    assert len(holders) == 1
    # 13 requests, one load in the whole deployment
    assert sum(s["lora_adapter_loads"] for s in _stats().values()) == before + 1


def test_models_lists_loaded_adapters(client):
    complete(client, f"{CHAT}:pirate")
    ids = wait_for(lambda: (ids := {m.id for m in client.models.list().data}) and f"{CHAT}:pirate" in ids and ids,
                   timeout=30, what="/v1/models to list the pirate adapter")
    assert CHAT in ids
    card = client.models.retrieve(f"{CHAT}:pirate")
    assert card.id == f"{CHAT}:pirate"


def test_unknown_bad_and_broken_adapters_are_clear_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        complete(client, f"{CHAT}:nobody")
    assert "nobody" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, f"{CHAT}:..%2Fetc")
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, f"{CHAT}:broken")
    assert "broken" in info.value.message
    with pytest.raises(openai.NotFoundError):
        complete(client, "other-model:pirate")
    assert complete(client, f"{CHAT}:pirate")  # still serving
