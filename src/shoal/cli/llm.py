"""`shoal llm serve`: the OpenAI-compatible server on the bundled models, in the foreground.

It deploys `build_openai_app` on the embedded runtime, shows each model's replicas as they load,
prints a ready-to-paste request once every model answers, and serves until Ctrl-C or SIGTERM.
Only click is imported up front, so `shoal --help` stays fast.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from typing import Any, Optional

import click

from shoal.llm.models import DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL

APP_NAME = "llm"
_PROGRESS_POLL_S = 0.5


@click.group("llm")
def llm() -> None:
    """Serve language models behind an OpenAI-compatible API."""


@llm.command("serve")
@click.option("--model", "models", multiple=True, metavar="SOURCE",
              help="Model to serve: a bundled name, a local directory or .gguf file, package:<dist>, or a "
                   f"hub id. Repeat for several. Default: {DEFAULT_CHAT_MODEL} and {DEFAULT_EMBEDDING_MODEL}.")
@click.option("--config", "configs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An LLMConfig YAML file (Ray Serve LLM's format); repeatable. Replaces the default models.")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
              help="Replicas per model.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "int8", "bfloat16", "float16", "float32"]),
              help="Weight precision of generation models (auto: int8 on CPU, bfloat16 on CUDA).")
@click.option("--engine", default="auto", show_default=True,
              type=click.Choice(["auto", "llama_cpp", "transformers"]),
              help="Engine of generation models (auto: llama.cpp for .gguf files on CPU, else transformers).")
@click.option("--max-num-seqs", default=None, type=click.IntRange(min=1),
              help="Sequences decoded together per replica (continuous batching); more wait in a queue.")
@click.option("--max-model-len", default=None, type=click.IntRange(min=16),
              help="Context per request, prompt plus completion, in tokens (default: the llama.cpp "
                   "engine's 768-token KV slot; the model's own context for transformers). The llama.cpp "
                   "engine keeps a slot of this many tokens per sequence, so memory grows with it.")
@click.option("--max-queued-requests", default=-1, show_default=True, type=int,
              help="Requests a caller may queue per model before answering 429 (-1: no limit).")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="SHOAL_HTTP_HOST",
              help="Address the HTTP server listens on.")
@click.option("--port", default=8000, show_default=True, type=int, envvar="SHOAL_HTTP_PORT",
              help="Port the HTTP server listens on (0: any free port).")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY",
              help="Require `Authorization: Bearer KEY` on /v1/*; repeat for several keys (named key-1, "
                   "key-2, ...). Default: the comma-separated keys in $SHOAL_API_KEY; none: the API is open.")
@click.option("--api-keys-file", type=click.Path(exists=True, dir_okay=False),
              help="A YAML list of API keys with names and limits (name, key or key_env, "
                   "requests_per_minute, tokens_per_minute); added to --api-key's.")
def serve_command(models: tuple[str, ...], configs: tuple[str, ...], replicas: int, dtype: str,
                  engine: str, max_num_seqs: Optional[int], max_model_len: Optional[int],
                  max_queued_requests: int, host: str, port: int,
                  api_keys: tuple[str, ...], api_keys_file: Optional[str]) -> None:
    """Serve models on http://HOST:PORT/v1 until Ctrl-C or SIGTERM."""
    from shoal.llm import LLMConfig, build_openai_app
    from shoal.llm.config import load_llm_config

    try:
        keys = _api_keys(api_keys, api_keys_file)
        llm_configs = [load_llm_config(path) for path in configs]
        sources = models or (() if configs else (DEFAULT_CHAT_MODEL, DEFAULT_EMBEDDING_MODEL))
        deployment_config: dict[str, Any] = {"num_replicas": replicas}
        if max_queued_requests != -1:
            deployment_config["max_queued_requests"] = max_queued_requests
        from shoal.llm.models import resolve_model_source

        embedding = {c.model_id: _is_embedding(c.model_loading_config.source) for c in llm_configs}
        for source in sources:
            # Resolved once, here: a wrong path or an unreachable hub fails in one line.
            is_embedding = resolve_model_source(source).format == "sentence-transformers"
            model_id = _model_id(source)
            embedding[model_id] = is_embedding
            llm_configs.append(LLMConfig(
                model_loading_config={"model_id": model_id, "model_source": source},
                engine_kwargs={} if is_embedding else _engine_kwargs(dtype, max_num_seqs, engine, max_model_len),
                deployment_config=deployment_config,
            ))
        app = build_openai_app({"llm_configs": llm_configs, "api_keys": keys})
    except Exception as exc:  # noqa: BLE001 - a bad option is one clear line
        raise click.ClickException(str(exc)) from None
    chat_model = next((c.model_id for c in llm_configs if not embedding[c.model_id]), None)
    sys.exit(_serve_in_foreground(app, [c.model_id for c in llm_configs], chat_model, host, port, bool(keys)))


def _api_keys(given: tuple[str, ...], path: Optional[str]) -> list[Any]:
    """`--api-key`s (else `SHOAL_API_KEY`'s), then the keys of `--api-keys-file`."""
    from shoal.llm.api_keys import keys_from_env, load_api_keys

    plain = list(given) or keys_from_env()
    keys: list[Any] = [{"name": f"key-{i}", "key": key} for i, key in enumerate(plain, 1)]
    if path:
        import yaml

        listed = yaml.safe_load(open(path).read())
        if not isinstance(listed, list) or not all(isinstance(k, dict) for k in listed):
            raise ValueError(f"{path}: an API keys file holds a list of mappings (name, key or key_env, ...)")
        keys.extend(listed)
    return load_api_keys(keys)


def _is_embedding(source: str) -> bool:
    from shoal.llm.models import resolve_model_source

    try:
        return resolve_model_source(source).format == "sentence-transformers"
    except Exception:  # noqa: BLE001 - the replica reports a bad source with its reason
        return False


def _engine_kwargs(dtype: str, max_num_seqs: Optional[int], engine: str = "auto",
                   max_model_len: Optional[int] = None) -> dict[str, Any]:
    """Generation-engine options (embedding models take none of them)."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if engine != "auto":
        kwargs["engine"] = engine
    if max_num_seqs is not None:
        kwargs["max_num_seqs"] = max_num_seqs
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    return kwargs


def _model_id(source: str) -> str:
    """The name clients send: a path's last part without `.gguf`, otherwise the source itself."""
    from pathlib import Path

    if source.startswith(("/", ".", "~")) or source.endswith(".gguf"):
        return Path(source).name.removesuffix(".gguf")
    return source.removeprefix("package:")


def _serve_in_foreground(app: Any, model_ids: list[str], chat_model: Optional[str], host: str, port: int,
                         with_keys: bool = False) -> int:
    """Deploy with progress, print how to call it, block; always shut down. Returns the exit code."""
    from shoal import api
    from shoal import client as client_mod
    from shoal.cli.signals import Signals, StopRequested

    signals = Signals()
    signals.install()
    code = 0
    try:
        api.start(http_options={"host": host, "port": port})
        client = client_mod.get_global_client()
        lost: list[bool] = []
        client.on_controller_lost = lambda: lost.append(True)  # type: ignore[union-attr]
        signals.allow_interrupt()
        spec = api.build_app_spec(app, APP_NAME, "/")
        client.call_sync("deploy_app", spec)  # type: ignore[union-attr]
        error = _watch_deploy(api, lost)
        if error:
            signals.defer_interrupt()
            click.echo(f"Error: {error}", err=True)
            return 1
        click.echo(_ready_message(api.get_http_url() or f"http://{host}:{port}", model_ids, chat_model, with_keys))
        while not lost:
            time.sleep(0.2)
        signals.defer_interrupt()
        click.echo("Error: the shoal controller exited unexpectedly; stopping.", err=True)
        code = 1
    except StopRequested as stop:
        signals.defer_interrupt()
        sig = stop.args[0] if stop.args else signal.SIGINT
        click.echo(f"Got {signal.Signals(sig).name}; shutting down.", err=True)
    except Exception as exc:  # noqa: BLE001 - e.g. the port is taken
        signals.defer_interrupt()
        click.echo(f"Error: {exc}", err=True)
        code = 1
    finally:
        signals.defer_interrupt()
        try:
            api.shutdown()
        finally:
            signals.restore()
    return code


def _watch_deploy(api: Any, lost: list[bool]) -> Optional[str]:
    """Print each deployment's replica states as they change until the app runs; the error, if any."""
    from shoal.cli.output import DeployProgress

    started = time.monotonic()
    progress = DeployProgress(
        lambda line: click.echo(f"[{time.monotonic() - started:5.1f}s] {line}", err=True), [APP_NAME]
    )
    while not lost:
        status = api.status().to_dict()
        progress.update(status)
        outcome = progress.outcome(status)
        if outcome is True:
            return None
        if outcome is False:
            return "the models failed to load (see above)"
        time.sleep(_PROGRESS_POLL_S)
    return "the shoal controller exited unexpectedly"


def _ready_message(url: str, model_ids: list[str], chat_model: Optional[str], with_keys: bool = False) -> str:
    base = url.rstrip("/") + "/v1"
    lines = [f"\nServing {', '.join(model_ids)} at {base} (OpenAI-compatible). Press Ctrl-C to stop.\n"]
    # The key itself is never printed: the examples read it from $SHOAL_API_KEY.
    auth = ' -H "Authorization: Bearer $SHOAL_API_KEY"' if with_keys else ""
    if with_keys:
        lines.append("API keys are required: send `Authorization: Bearer <key>` (below: $SHOAL_API_KEY).\n")
    if chat_model:
        body = {"model": chat_model, "messages": [{"role": "user", "content": "Say hello in five words."}],
                "max_tokens": 32, "temperature": 0.2}
        lines.append("Try:\n  curl " + shlex.quote(f"{base}/chat/completions") + auth
                     + " -H 'Content-Type: application/json' \\\n    -d " + shlex.quote(json.dumps(body)))
    lines.append(f"Models: curl {base}/models{auth}")
    return "\n".join(lines) + "\n"
