"""From a config to what the controller deploys: one `ApplicationSpec` per application.

`build_specs` does it in this process. `build_specs_in_subprocess` (blocking) and `build_specs_async`
do it in a fresh `python -m shoal.builder` process: the admin API uses it so that importing user code
never happens inside the controller (a module that hangs, crashes or changed since the last deploy
cannot harm or fool it), and the CLI (`shoal run CONFIG`, `--reload`, `deploy --runtime ray`) so that a
hung import can be killed and edited modules are imported anew.

A build is bounded: after `build_timeout_s()` seconds (`--build-timeout`, $SHOAL_BUILD_TIMEOUT_S, default
120) the builder is killed and the error names the application, its import path and the step it was
in. The builder runs in a process group of its own, which is SIGKILLed on a time-out and when the
caller is interrupted or cancelled, so whatever user code started dies with it. It never outlives its
parent: on Linux it asks for SIGKILL when the parent (thread) dies (`PR_SET_PDEATHSIG`), and on any
POSIX system a forked guard kills the whole group once its stdin pipe closes, which the parent does
when the build is over and the kernel does when the parent dies.

Protocol: the builder reads `{"config": ..., "app_dir": ...}` as one JSON line on stdin (which stays
open) and writes pickles on stdout: `("step", index, name, import_path, "import"|"build"|"prepare")`
before each step that runs user code, then `("ok", [ApplicationSpec, ...])` or
`("error", [problem line, ...])`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import warnings
from typing import Any, Callable, Optional

from shoal.controller.specs import ApplicationSpec
from shoal.schema import ConfigError, ServeDeploySchema, build_applications, parse_config

BUILD_TIMEOUT_ENV = "SHOAL_BUILD_TIMEOUT_S"
DEFAULT_BUILD_TIMEOUT_S = 120.0
_DRAIN_S = 5.0  # after the builder exited: how long its output may still take to arrive


def build_timeout_s(value: Any = None, what: str = "the build timeout") -> float:
    """`value` (a number or its text), else $SHOAL_BUILD_TIMEOUT_S, else 120: the seconds a build may
    take. Raises `ConfigError` naming `what` for a value that is not a positive number."""
    where = what
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{what} must be a positive number of seconds, not {value!r}") from None
    if value is None:
        text = os.environ.get(BUILD_TIMEOUT_ENV, "").strip()
        if not text:
            return DEFAULT_BUILD_TIMEOUT_S
        where = f"${BUILD_TIMEOUT_ENV}"
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{where} must be a positive number of seconds, not {value!r}")
    return float(value)


def build_specs(schema: ServeDeploySchema, app_dir: Optional[str] = None, source: Optional[str] = None,
                on_step: Optional[Callable[[int, str], None]] = None) -> list[ApplicationSpec]:
    """Import every application of `schema`, call builders, apply overrides, pickle the code.
    `on_step(index, step)` is called before each step that runs user code ("import", "build",
    "prepare"). Raises `ConfigError` (lines prefixed with `source`)."""
    from shoal.api import build_app_spec

    specs = []
    for i, (app_schema, app) in enumerate(build_applications(schema, app_dir, source, on_step)):
        if on_step is not None:
            on_step(i, "prepare")
        try:
            spec = build_app_spec(app, app_schema.name, app_schema.route_prefix)
            if app_schema.autoscaling_policy is not None:
                from shoal.config import AutoscalingPolicy

                spec.autoscaling_policy = AutoscalingPolicy.model_validate(app_schema.autoscaling_policy).prepared()
            specs.append(spec)
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


def _request(config: dict, app_dir: Optional[str]) -> bytes:
    return json.dumps({"config": config, "app_dir": app_dir}).encode() + b"\n"  # one line


def _kill_group(pid: int) -> None:
    """SIGKILL the builder's process group: the builder, its guard, and whatever user code started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _messages(out: bytes) -> tuple[Optional[tuple], Optional[tuple]]:
    """The builder's last ("step", ...) message and its answer, from what it wrote (a killed builder
    wrote no answer, and maybe half a message)."""
    stream = io.BytesIO(out)
    step = answer = None
    while stream.tell() < len(out):
        try:
            message = pickle.load(stream)
        except Exception:  # noqa: BLE001 - cut short
            break
        if message[0] == "step":
            step = message
        else:
            answer = message
    return step, answer


def _tail(err: bytes, label: str = "", lines: int = 20) -> str:
    tail = err.decode(errors="replace").strip().splitlines()[-lines:]
    return label + ":\n" + "\n".join(tail) if tail else ""


def _timed_out(timeout: float, step: Optional[tuple], source: Optional[str], err: bytes) -> ConfigError:
    killed = (f"the builder process was killed (raise the limit with --build-timeout or {BUILD_TIMEOUT_ENV})")
    if step is None:
        return ConfigError(f"building the applications timed out after {timeout:g} s before the builder process "
                           f"started importing; {killed}{_tail(err, '. Its output')}", source)
    _, index, name, import_path, phase = step
    doing = {"import": f"while importing '{import_path}'",
             "build": f"while calling the application builder '{import_path}'",
             "prepare": f"while preparing its deployments (pickling the code from '{import_path}')"}[phase]
    return ConfigError(f"applications[{index}].import_path: building application '{name}' timed out after "
                       f"{timeout:g} s {doing}; {killed}{_tail(err, '. Its output')}", source)


def _outcome(code: Optional[int], out: bytes, err: bytes, timeout: float, timed_out: bool,
             source: Optional[str]) -> list[ApplicationSpec]:
    step, answer = _messages(out)
    if answer is None:
        if timed_out:
            raise _timed_out(timeout, step, source, err)
        raise ConfigError(f"building the applications failed (builder exit code {code}){_tail(err)}", source)
    kind, payload = answer
    if kind == "error":
        raise ConfigError(payload, source)
    return payload


def build_specs_in_subprocess(config: dict, app_dir: Optional[str] = None, timeout: Optional[float] = None,
                              source: Optional[str] = None, echo_output: bool = True) -> list[ApplicationSpec]:
    """`build_specs` in a fresh process, blocking; killed (with everything it started) after `timeout`
    seconds (default: `build_timeout_s()`) or when this call is interrupted. The builder's output goes
    to this process's stderr when `echo_output`. Raises `ConfigError` (lines prefixed with `source`)."""
    timeout = build_timeout_s(timeout)
    cmd, env, cwd = _command(app_dir)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=cwd, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    output: dict[Any, list[bytes]] = {proc.stdout: [], proc.stderr: []}
    threads = [threading.Thread(target=_drain, args=(f, chunks), daemon=True) for f, chunks in output.items()]
    threads.append(threading.Thread(target=_feed, args=(proc.stdin, _request(config, app_dir)), daemon=True))
    for t in threads:
        t.start()
    timed_out = False
    try:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:  # also on Ctrl-C: nothing of the build survives this call
        if proc.returncode is None:
            _kill_group(proc.pid)
            proc.wait()
        _close(proc.stdin)  # the builder's guard now stops whatever the build left running
    for t in threads[:2]:
        t.join(_DRAIN_S)
    out, err = b"".join(output[proc.stdout]), b"".join(output[proc.stderr])
    if echo_output:
        sys.stderr.write(err.decode(errors="replace"))
        err = b""
    return _outcome(proc.returncode, out, err, timeout, timed_out, source)


def _drain(f: Any, chunks: list[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):
        while chunk := f.read1(1 << 16):
            chunks.append(chunk)


def _feed(f: Any, data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):  # the builder is gone: its exit code tells why
        f.write(data)
        f.flush()


def _close(f: Any) -> None:
    with contextlib.suppress(OSError, ValueError):
        f.close()


async def build_specs_async(config: dict, app_dir: Optional[str] = None, timeout: Optional[float] = None,
                            source: Optional[str] = None) -> list[ApplicationSpec]:
    """`build_specs` in a fresh process, without blocking the event loop; killed (with everything it
    started) after `timeout` seconds (default: `build_timeout_s()`) or when the awaiting task is
    cancelled. Raises `ConfigError`."""
    timeout = build_timeout_s(timeout)
    cmd, env, cwd = _command(app_dir)
    proc = await asyncio.create_subprocess_exec(*cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    reads = [asyncio.ensure_future(proc.stdout.read()), asyncio.ensure_future(proc.stderr.read())]

    async def talk() -> None:
        with contextlib.suppress(OSError):  # the builder is gone: its exit code tells why
            proc.stdin.write(_request(config, app_dir))  # type: ignore[union-attr]
            await proc.stdin.drain()  # type: ignore[union-attr]
        await proc.wait()

    timed_out = False
    try:
        try:
            await asyncio.wait_for(talk(), timeout)
        except asyncio.TimeoutError:
            timed_out = True
    finally:  # also when cancelled (a newer deploy, the client left, shutdown): nothing of it survives
        if proc.returncode is None:
            _kill_group(proc.pid)
            with contextlib.suppress(asyncio.CancelledError):
                await proc.wait()
        proc.stdin.close()  # the builder's guard now stops whatever the build left running
        done, pending = await asyncio.wait(reads, timeout=_DRAIN_S)
        for r in pending:
            r.cancel()
    out, err = (r.result() if r in done and not r.cancelled() and r.exception() is None else b"" for r in reads)
    return _outcome(proc.returncode, out, err, timeout, timed_out, source)


# --- the builder process -------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this process when the thread that spawned it exits (the parent's
    main or event-loop thread, which waits for the build), even if user code holds the GIL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_guard() -> None:
    """Fork a guard that SIGKILLs this process group once stdin reaches EOF: when the parent closes it
    (the build is over, successful or not) or dies (the kernel closes it). It holds nothing else
    open, so the parent's reads end when the builder exits."""
    if os.getpgrp() != os.getpid():  # run by hand, not as a group of its own: nothing to guard
        return
    if os.fork() != 0:
        return
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.closerange(3, min(os.sysconf("SC_OPEN_MAX"), 1 << 16))
        while os.read(0, 1 << 16):
            pass
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


def _main() -> None:
    _die_with_parent()
    request: Any = json.loads(sys.stdin.buffer.readline() or b"null")
    if request is None:  # the parent went away before sending the request
        return
    _start_guard()
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # user code (and what it starts) reads nothing
    # User code may print: keep the real stdout for the answer, send everything else to stderr.
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(message: tuple) -> None:
        answer.write(pickle.dumps(message))
        answer.flush()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller validated the config and reported its warnings
            schema = parse_config(request["config"])

        def on_step(index: int, step: str) -> None:
            app = schema.applications[index]
            send(("step", index, app.name, app.import_path, step))

        result: tuple = ("ok", build_specs(schema, request.get("app_dir"), on_step=on_step))
    except ConfigError as e:
        result = ("error", e.problems)
    send(result)


if __name__ == "__main__":
    _main()
