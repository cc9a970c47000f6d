"""From a config to what the controller deploys: one `ApplicationSpec` per application.

`build_specs` does it in this process. `build_specs_in_subprocess` does it in a fresh
`python -m shoal.builder` process: the admin API uses it so that importing user code never happens
inside the controller (a module that hangs, crashes or changed since the last deploy cannot harm
or fool it), and `shoal run --reload` uses it so that edited modules are imported anew.
The subprocess reads `{"config": ..., "app_dir": ...}` as JSON on stdin and writes one pickle on
stdout: `("ok", [ApplicationSpec, ...])` or `("error", [problem line, ...])`.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import warnings
from typing import Any, Optional

from shoal.controller.specs import ApplicationSpec
from shoal.schema import ConfigError, ServeDeploySchema, build_applications, parse_config

BUILD_TIMEOUT_S = 300.0


def build_specs(schema: ServeDeploySchema, app_dir: Optional[str] = None,
                source: Optional[str] = None) -> list[ApplicationSpec]:
    """Import every application of `schema`, call builders, apply overrides, pickle the code.
    Raises `ConfigError` (lines prefixed with `source`)."""
    from shoal.api import build_app_spec

    specs = []
    for app_schema, app in build_applications(schema, app_dir, source):
        try:
            specs.append(build_app_spec(app, app_schema.name, app_schema.route_prefix))
        except Exception as e:  # noqa: BLE001 - e.g. code that cannot be pickled
            raise ConfigError(f"application '{app_schema.name}': {e}", source) from None
    add_fingerprints(specs)
    return specs


def add_fingerprints(specs: list[ApplicationSpec]) -> None:
    """Give every deployment a code version that a rebuild in another process reproduces."""
    sources = _user_sources_digest()
    for spec in specs:
        for d in spec.deployments:
            d.code_fingerprint = _fingerprint(d.serialized_def, sources)


def _user_sources_digest() -> str:
    """A digest of every imported module that is the user's code (not the standard library, not an
    installed package, not shoal): it changes exactly when that code is edited."""
    import hashlib

    skip = {os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}}
    skip.add(os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    h = hashlib.sha256()
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        real = os.path.realpath(path)
        if any(real.startswith(s + os.sep) for s in skip) or "site-packages" in real or "dist-packages" in real:
            continue
        try:
            with open(real, "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
        except OSError:
            continue
    return h.hexdigest()


def _fingerprint(serialized_def: bytes, sources: str) -> Optional[str]:
    """For code pickled by import path: that path plus the sources digest. None for code pickled by
    value only (its bytes are all there is to compare)."""
    try:
        kind, *rest = pickle.loads(serialized_def)
    except Exception:  # noqa: BLE001
        return None
    if kind != "import":
        return None
    module, qualname = rest[0], rest[1]
    return f"import:{module}:{qualname}:{sources}"


def _command(app_dir: Optional[str]) -> tuple[list[str], dict, Optional[str]]:
    env = dict(os.environ)
    path = [p for p in [app_dir, *sys.path] if p]
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    return [sys.executable, "-m", "shoal.builder"], env, app_dir


def _decode(code: Optional[int], out: bytes, err: bytes) -> list[ApplicationSpec]:
    try:
        kind, payload = pickle.loads(out)
    except Exception:  # noqa: BLE001 - the builder died before writing its answer
        tail = err.decode(errors="replace").strip().splitlines()[-20:]
        raise ConfigError(f"building the applications failed (builder exit code {code})"
                          + (":\n" + "\n".join(tail) if tail else "")) from None
    if kind == "error":
        raise ConfigError(payload)
    return payload


def build_specs_in_subprocess(config: dict, app_dir: Optional[str] = None,
                              timeout: float = BUILD_TIMEOUT_S) -> list[ApplicationSpec]:
    """`build_specs` in a fresh process (blocking). Raises `ConfigError`."""
    cmd, env, cwd = _command(app_dir)
    try:
        done = subprocess.run(cmd, input=json.dumps({"config": config, "app_dir": app_dir}).encode(),
                              capture_output=True, env=env, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"building the applications took longer than {timeout:.0f} s") from None
    sys.stderr.write(done.stderr.decode(errors="replace"))
    return _decode(done.returncode, done.stdout, done.stderr)


async def build_specs_async(config: dict, app_dir: Optional[str] = None,
                            timeout: float = BUILD_TIMEOUT_S) -> list[ApplicationSpec]:
    """`build_specs` in a fresh process, without blocking the event loop."""
    cmd, env, cwd = _command(app_dir)
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=env, cwd=cwd)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(json.dumps({"config": config, "app_dir": app_dir}).encode()), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise ConfigError(f"building the applications took longer than {timeout:.0f} s") from None
    return _decode(proc.returncode, out, err)


def _main() -> None:
    # User code may print: keep the real stdout for the answer, send everything else to stderr.
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    request: Any = json.load(sys.stdin)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller validated the config and reported its warnings
            schema = parse_config(request["config"])
        result: tuple = ("ok", build_specs(schema, request.get("app_dir")))
    except ConfigError as e:
        result = ("error", e.problems)
    answer.write(pickle.dumps(result))
    answer.flush()


if __name__ == "__main__":
    _main()
