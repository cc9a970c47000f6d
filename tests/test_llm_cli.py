"""`shoal llm serve` (what `make serve` runs): both bundled models behind one OpenAI API, from the CLI."""

from __future__ import annotations

import os
import re
import signal

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import require_llm_stack  # noqa: E402

require_llm_stack()

import openai  # noqa: E402
from test_cli import EXIT_TIMEOUT_S, _is, _Proc, _shoal_cmd, _tree, _wait_all_gone, procs  # noqa: E402,F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_llm_serve_defaults_progress_example_and_clean_exit(tmp_path, procs):
    started, recorded = procs
    server = _Proc(_shoal_cmd() + ["llm", "serve", "--port", "0"], tmp_path)
    started.append(server)
    # Progress while the models load, one line per change of each deployment's replicas (the first
    # may say "no replicas" when it is printed before the controller has placed one).
    server.wait_for_line(r"llm/LLMServer:SmolLM2-135M-Instruct: .*\b(starting|running)\b", timeout=60, regex=True)
    ready = server.wait_for_line("(OpenAI-compatible)", timeout=240)
    base = re.search(r"at (http://\S+/v1) ", ready).group(1)
    # The ready-to-paste example names the chat model and the server's own address.
    server.wait_for_line(f"curl {base}/chat/completions")
    assert '"model": "SmolLM2-135M-Instruct"' in server.output

    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    assert sorted(m.id for m in client.models.list().data) == ["SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"]
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert reply.choices[0].message.content
    assert len(client.embeddings.create(model="all-MiniLM-L6-v2", input="hello").data[0].embedding) == 384

    tree = _tree(server.popen.pid)
    recorded.extend(tree)
    assert len([p for p in tree if _is(p, "shoal.replica.server")]) == 3  # ingress + two models
    server.popen.send_signal(signal.SIGINT)
    assert server.wait(60) == 0, server.output
    _wait_all_gone(tree, timeout=EXIT_TIMEOUT_S)


def test_llm_serve_bad_model_is_one_clear_line(tmp_path, procs):
    started, _ = procs
    server = _Proc(_shoal_cmd() + ["llm", "serve", "--port", "0", "--model", "/no/such/model.gguf"], tmp_path)
    started.append(server)
    assert server.wait(60) != 0
    assert "/no/such/model.gguf" in server.output and "Traceback" not in server.output


def test_llm_serve_with_api_keys(tmp_path, procs, monkeypatch):
    """`shoal llm serve` with a key from SHOAL_API_KEY and a limited one from --api-keys-file: 401
    without a key, 429 past the limit, and the keys never printed. (Also `--max-model-len`, to save
    starting another server: the context it sets is the one a too-long prompt is refused with.)"""
    started, _ = procs
    monkeypatch.setenv("SHOAL_API_KEY", "sk-env-key-0123456789")
    monkeypatch.setenv("SHOAL_TEST_LIMITED_KEY", "sk-limited-key-9876543210")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("- {name: limited, key_env: SHOAL_TEST_LIMITED_KEY, requests_per_minute: 1}\n")
    server = _Proc(_shoal_cmd() + ["llm", "serve", "--port", "0", "--model", "SmolLM2-135M-Instruct",
                                   "--api-keys-file", str(keys_file), "--max-model-len", "2048"], tmp_path)
    started.append(server)
    ready = server.wait_for_line("(OpenAI-compatible)", timeout=240)
    base = re.search(r"at (http://\S+/v1) ", ready).group(1)
    server.wait_for_line(f"curl {base}/models")
    assert 'Authorization: Bearer $SHOAL_API_KEY' in server.output

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()
    env_client = openai.OpenAI(base_url=base, api_key="sk-env-key-0123456789", max_retries=0, timeout=120)
    reply = env_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Say hello."}], max_tokens=4
    )
    assert reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as too_long:
        env_client.completions.create(model="SmolLM2-135M-Instruct", prompt="word " * 3000, max_tokens=4)
    assert "maximum context length is 2048 tokens" in too_long.value.message
    limited = openai.OpenAI(base_url=base, api_key="sk-limited-key-9876543210", max_retries=0, timeout=120)
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as info:
        limited.models.list()
    assert int(info.value.response.headers["retry-after"]) >= 1
    server.popen.send_signal(signal.SIGINT)
    assert server.wait(60) == 0, server.output
    assert "sk-env-key" not in server.output and "sk-limited-key" not in server.output
