"""Ray Serve's public surface and the experience around it (issue 13, "Surface and experience").

- `shoal.serve` is a package with Ray's public modules and names; `run_many`, `RunTarget`,
  `shutdown_async`, `handle.shutdown()`; handles cached per name.
- `logging_config` (deployment, application, local testing mode) sets the serve loggers' level.
- A driver script named like a library does not shadow it in shoal's own processes.
- A failing constructor prints its traceback once per attempt; exited session directories are
  removed; `shoal status` finds a `shoal run` instance.

Tests that involve processes start real ones (drivers, `shoal run`, controllers, replicas).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import shoal
from conftest import wait_for
from shoal import serve, sessions

SRC = os.path.dirname(os.path.dirname(os.path.abspath(shoal.__file__)))

# --- 15: the package mirrors ray.serve's modules ---------------------------------------------------
# Ray Serve's public names per module (`@PublicAPI`/`@DeveloperAPI` in ray/serve/<module>.py, and what
# those modules re-export for users).
RAY_PUBLIC = {
    "handle": {"DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator",
               "DeploymentBroadcastResponse"},
    "config": {"AutoscalingConfig", "AutoscalingContext", "AutoscalingPolicy", "AggregationFunction",
               "RequestRouterConfig", "BackpressureConfig", "ProxyLocation", "HTTPOptions", "gRPCOptions",
               "ControllerOptions", "GangPlacementStrategy", "GangRuntimeFailurePolicy", "GangSchedulingConfig",
               "DeploymentActorConfig"},
    "schema": {"LoggingConfig", "EncodingType", "TracingConfig", "RayActorOptionsSchema", "DeploymentSchema",
               "ServeApplicationSchema", "gRPCOptionsSchema", "HTTPOptionsSchema", "ServeDeploySchema",
               "ProxyStatus", "ApplicationStatus", "DeploymentStatus", "DeploymentStatusTrigger", "ReplicaState",
               "DeploymentStatusOverview", "ApplicationStatusOverview", "ServeStatus", "ReplicaRank",
               "ServeActorDetails", "ReplicaDetails", "DeploymentDetails", "ApplicationDetails", "ProxyDetails",
               "ServeInstanceDetails", "AutoscalingMetricsHealth", "AutoscalingStatus", "ScalingDecision",
               "DeploymentAutoscalingDetail", "APIType", "DeploymentNode", "DeploymentTopology", "Target",
               "TargetGroup", "DurationStats", "ControllerHealthMetrics", "CeleryAdapterConfig",
               "TaskProcessorConfig", "TaskResult", "TaskProcessorAdapter", "ScaleDeploymentRequest"},
    "exceptions": {"RayServeException", "BackPressureError", "RequestCancelledError", "DeploymentUnavailableError",
                   "ReplicaUnavailableError", "gRPCStatusError"},
    "context": {"ReplicaContext", "ReplicaRank", "DeploymentActorContext"},
    "request_router": {"RequestRouter", "FIFOMixin", "LocalityMixin", "MultiplexMixin", "PendingRequest",
                       "RunningReplica", "ReplicaID"},
    "autoscaling_policy": {"default_autoscaling_policy", "replica_queue_length_autoscaling_policy",
                           "AutoscalingContext", "AutoscalingConfig"},
    "multiplex": set(),
    "batching": {"batch"},
}
# What shoal does not have, on purpose: Ray Core and cluster features, gRPC, the dashboard's REST models,
# task processors.
NOT_PROVIDED = {
    "config": {"gRPCOptions", "ControllerOptions", "GangPlacementStrategy", "GangRuntimeFailurePolicy",
               "GangSchedulingConfig", "DeploymentActorConfig"},
    "schema": {"TracingConfig", "ServeActorDetails", "ReplicaDetails", "DeploymentDetails", "ApplicationDetails",
               "ProxyDetails", "ServeInstanceDetails", "AutoscalingMetricsHealth", "AutoscalingStatus",
               "ScalingDecision", "DeploymentAutoscalingDetail", "APIType", "DeploymentNode", "DeploymentTopology",
               "Target", "TargetGroup", "DurationStats", "ControllerHealthMetrics", "CeleryAdapterConfig",
               "TaskProcessorConfig", "TaskResult", "TaskProcessorAdapter", "ScaleDeploymentRequest"},
    "exceptions": {"gRPCStatusError"},
    "context": {"DeploymentActorContext"},
    "handle": {"DeploymentBroadcastResponse"},
}
# Added by other parts of issue 13 (branches merged separately): exported as soon as they exist.
# Once merged, this set should be empty.
PENDING = {
    "config": {"AutoscalingPolicy", "AggregationFunction"},
    "schema": {"EncodingType", "ReplicaRank"},
    "context": {"ReplicaRank"},
    "exceptions": {"ReplicaUnavailableError"},
    "request_router": {"RequestRouter", "FIFOMixin", "LocalityMixin", "MultiplexMixin", "PendingRequest",
                       "RunningReplica"},
    "autoscaling_policy": {"replica_queue_length_autoscaling_policy"},
}
# Where each exported name comes from (the object must be shoal's own, not a copy).
IMPLEMENTED_IN = {
    "DeploymentHandle": "shoal.handle", "DeploymentResponse": "shoal.handle", "ProxyLocation": "shoal.config",
    "HTTPOptions": "shoal.config", "AutoscalingConfig": "shoal.config", "ServeDeploySchema": "shoal.schema",
    "ApplicationStatus": "shoal.status", "RayServeException": "shoal.exceptions", "ReplicaContext": "shoal.context",
    "ReplicaID": "shoal.common", "batch": "shoal.batching", "multiplexed": "shoal.multiplex",
    "default_autoscaling_policy": "shoal.autoscaling_policy",
}


@pytest.mark.parametrize("module", sorted(RAY_PUBLIC))
def test_serve_module_mirrors_ray(module):
    mod = importlib.import_module(f"shoal.serve.{module}")
    assert getattr(serve, module) is mod  # `serve.config.ProxyLocation` works as in Ray
    exported = set(mod.__all__)
    for name in exported:
        assert hasattr(mod, name)
    unexplained = RAY_PUBLIC[module] - exported - NOT_PROVIDED.get(module, set()) - PENDING.get(module, set())
    assert not unexplained, f"ray.serve.{module} names that shoal.serve.{module} lacks: {sorted(unexplained)}"
    for name in exported & set(IMPLEMENTED_IN):
        assert getattr(mod, name) is getattr(importlib.import_module(IMPLEMENTED_IN[name]), name)


def test_import_forms_of_ray_code_work():
    from shoal.serve.config import AutoscalingConfig, AutoscalingContext, HTTPOptions, ProxyLocation  # noqa: F401
    from shoal.serve.exceptions import BackPressureError, RayServeException  # noqa: F401
    from shoal.serve.handle import DeploymentHandle, DeploymentResponse  # noqa: F401
    from shoal.serve.schema import LoggingConfig, ServeDeploySchema  # noqa: F401

    assert ProxyLocation.EveryNode.value == "EveryNode"
    assert LoggingConfig(log_level="DEBUG").log_level == "DEBUG"
    for name in ("run_many", "RunTarget", "shutdown_async", "run", "start", "shutdown", "get_app_handle"):
        assert name in serve.__all__ and hasattr(shoal, name)
    # The submodules stay out of `from shoal.serve import *`, which would rebind shoal.config & co.
    assert shoal.config.__name__ == "shoal.config" and "config" not in serve.__all__


def test_missing_names_fail_like_missing_names():
    with pytest.raises(ImportError):
        from shoal.serve.config import DeploymentActorConfig  # noqa: F401


def test_reexport_tolerates_absent_modules_and_names():
    from shoal.serve._reexport import MISSING, reexport

    ns = {"__name__": "shoal.serve._probe"}
    names = reexport(ns, {"shoal.no_such_module": ["A", "B"], "shoal.config": ["B", "HTTPOptions", "Nope"]})
    assert names == ["HTTPOptions"] and ns["HTTPOptions"] is shoal.config.HTTPOptions
    assert sorted(MISSING["shoal.serve._probe"]) == ["A", "B", "Nope"]


# --- 15: run_many, handles ------------------------------------------------------------------------
@serve.deployment
class Echo:
    def __init__(self, tag: str = "echo"):
        self.tag = tag

    def __call__(self, x=None):
        return self.tag if x is None else f"{self.tag}:{x}"


@serve.deployment
class Caller:
    def __init__(self, inner):
        self.inner = inner

    async def __call__(self):
        return "via " + await self.inner.remote()


def test_run_many_deploys_every_target(serve_app):
    a, b = serve.run_many([serve.RunTarget(Echo.bind("a"), name="app_a", route_prefix="/a"),
                           serve.RunTarget(Caller.bind(Echo.bind("inner")), name="app_b", route_prefix=None)])
    assert a.remote().result() == "a"
    assert b.remote().result() == "via inner"
    apps = serve.status().applications
    assert apps["app_a"].status == "RUNNING" and apps["app_b"].status == "RUNNING"
    # The handles are the ones this process keeps per name.
    assert a is serve.get_app_handle("app_a") and b is serve.get_app_handle("app_b")


def test_run_many_without_waiting_returns_handles_that_work(serve_app):
    (h,) = serve.run_many([serve.RunTarget(Echo.bind("later"), name="later", route_prefix="/later")],
                          wait_for_applications_running=False)
    assert h.remote(1).result(timeout_s=60) == "later:1"  # the call waits for a replica
    h2 = serve._run(Echo.bind("again"), _blocking=False, name="again", route_prefix="/again")
    assert h2.remote().result(timeout_s=60) == "again"


@pytest.mark.parametrize("targets, error", [
    ([], "No applications"),
    (lambda: [serve.RunTarget(Echo.bind(), name="x", route_prefix="/x"),
              serve.RunTarget(Echo.bind(), name="x", route_prefix="/y")], "name 'x' appears more than once"),
    (lambda: [serve.RunTarget(Echo.bind(), name="x", route_prefix="/x"),
              serve.RunTarget(Echo.bind(), name="y", route_prefix="/x")], "prefix '/x' appears more than once"),
    (lambda: [serve.RunTarget(Echo, name="x")], "call `.bind()`"),
    (lambda: [serve.RunTarget(Echo.bind(), name="")], "non-empty"),
])
def test_run_many_rejects_bad_targets_before_deploying(targets, error):
    with pytest.raises((ValueError, TypeError), match=re.escape(error)):
        serve.run_many(targets() if callable(targets) else targets)


def test_handles_are_cached_per_name(serve_app):
    h = serve.run(Echo.bind(), name="cached", route_prefix="/cached")
    assert serve.get_app_handle("cached") is h
    d = serve.get_deployment_handle("Echo", "cached")
    assert serve.get_deployment_handle("Echo", "cached") is d
    assert d.remote("x").result() == "echo:x"
    assert h.options(method_name="__call__") is not h  # options() still makes a new handle
    # One router per event loop, shared by every call through the cached handle.
    assert h.remote().result() == "echo" and serve.get_app_handle("cached").remote().result() == "echo"
    assert len(h._routers) == 1


def test_handle_shutdown_closes_its_routers_and_the_handle_still_works(serve_app):
    h = serve.run(Echo.bind(), name="closing", route_prefix="/closing")
    assert h.remote().result() == "echo"
    routers = list(h._routers.values())
    h.shutdown()
    assert not h._routers
    wait_for(lambda: all(r.closed for r in routers), what="the handle's routers to close")
    assert h.remote().result() == "echo"  # a new router
    h2 = h.options(method_name="__call__")

    async def main():
        assert await h2.remote("a") == "echo:a"
        await h2.shutdown_async()
        return await h2.remote("b")

    assert asyncio.run(main()) == "echo:b"


def test_local_testing_mode_run_many_and_cached_handles():
    try:
        a, b = serve.run_many([serve.RunTarget(Echo.bind("a"), name="la", route_prefix="/a"),
                               serve.RunTarget(Echo.bind("b"), name="lb", route_prefix="/b")],
                              _local_testing_mode=True)
        assert (a.remote().result(), b.remote().result()) == ("a", "b")
        assert serve.get_app_handle("la") is a and serve.get_deployment_handle("Echo", "lb") is b
        (a2,) = serve.run_many([serve.RunTarget(Echo.bind("a2"), name="la")], _local_testing_mode=True)
        assert a2.remote().result() == "a2" and b.remote().result() == "b"  # only "la" was replaced
    finally:
        serve.shutdown()


# --- 16: logging_config ---------------------------------------------------------------------------
@serve.deployment
class Levels:
    def __call__(self):
        return (logging.getLogger("ray.serve").level, logging.getLogger("shoal").level, os.getpid())


@serve.deployment(logging_config={"log_level": "ERROR"})
class OwnLevel:
    def __call__(self):
        return logging.getLogger("ray.serve").level


@serve.deployment
class Router:
    def __init__(self, own):
        self.own = own

    async def __call__(self):
        return logging.getLogger("ray.serve").level, await self.own.remote()


def test_log_level_of_a_deployment_and_of_its_application(serve_app):
    # Default: INFO.
    level, shoal_level, _ = serve.run(Levels.bind(), name="lv", route_prefix="/lv").remote().result()
    assert (level, shoal_level) == (logging.INFO, logging.INFO)
    # The deployment's own.
    h = serve.run(Levels.options(logging_config={"log_level": "DEBUG"}).bind(), name="lv", route_prefix="/lv")
    assert h.remote().result()[:2] == (logging.DEBUG, logging.DEBUG)
    # The application's applies to deployments with none of their own; a deployment's own wins.
    h = serve.run(Router.bind(OwnLevel.bind()), name="app_level", route_prefix="/al",
                  logging_config={"log_level": "WARNING"})
    assert h.remote().result() == (logging.WARNING, logging.ERROR)
    from shoal.schema import LoggingConfig as SchemaLoggingConfig

    h = serve.run(Levels.bind(), name="lv2", route_prefix="/lv2", logging_config=SchemaLoggingConfig(log_level=10))
    assert h.remote().result()[:2] == (logging.DEBUG, logging.DEBUG)
    # The bound Deployment itself is unchanged (the app's config went into the deployed copy).
    assert Levels.logging_config is None


def test_log_level_change_reconfigures_the_running_replica(serve_app):
    # A `version` keeps the code version across runs (an unversioned re-run replaces replicas, as in Ray).
    versioned = Levels.options(version="1")
    h = serve.run(versioned.options(logging_config={"log_level": "INFO"}).bind(), name="relv", route_prefix="/relv")
    level, _, pid = h.remote().result()
    assert level == logging.INFO
    h = serve.run(versioned.options(logging_config={"log_level": "DEBUG"}).bind(), name="relv", route_prefix="/relv")
    wait_for(lambda: h.remote().result()[0] == logging.DEBUG, what="the new log level")
    assert h.remote().result()[2] == pid  # the same process: reconfigured, not restarted


def test_invalid_logging_config_is_rejected():
    with pytest.raises(ValueError, match="log_level"):
        serve.run(Levels.bind(), logging_config={"log_level": "LOUD"}, _local_testing_mode=True)
    with pytest.raises(TypeError, match="LoggingConfig or a dict"):
        serve.run(Levels.bind(), logging_config="DEBUG", _local_testing_mode=True)


def test_local_testing_mode_sets_the_serve_loggers():
    before = {n: logging.getLogger(n).level for n in ("ray.serve", "shoal")}
    try:
        h = serve.run(Levels.bind(), logging_config={"log_level": "WARNING"}, _local_testing_mode=True)
        assert h.remote().result()[:2] == (logging.WARNING, logging.WARNING)
        h = serve.run(Levels.bind(), name="again", _local_testing_mode=True)  # none given: INFO again (as Ray)
        assert h.remote().result()[:2] == (logging.INFO, logging.INFO)
    finally:
        serve.shutdown()
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


DEBUG_DRIVER = """
import logging
from shoal import serve

@serve.deployment
class Model:
    def __call__(self):
        logging.getLogger("ray.serve").debug("DEBUG-LINE-%s", "shown")
        logging.getLogger("ray.serve").info("INFO-LINE")
        return "ok"

assert serve.run(Model.bind(), name="quiet", route_prefix="/quiet").remote().result() == "ok"
assert serve.run(Model.bind(), name="loud", route_prefix="/loud",
                 logging_config={"log_level": "DEBUG"}).remote().result() == "ok"
serve.shutdown()  # the controller echoes the replicas' last lines before it exits
"""


def test_debug_lines_reach_the_driver_only_where_asked(tmp_path):
    (tmp_path / "driver.py").write_text(DEBUG_DRIVER)
    out = subprocess.run([sys.executable, "driver.py"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert [ln for ln in lines if "DEBUG-LINE-shown" in ln and "(loud/Model" in ln], out.stderr
    assert not [ln for ln in lines if "DEBUG-LINE" in ln and "(quiet/Model" in ln], out.stderr
    assert [ln for ln in lines if "INFO-LINE" in ln and "(quiet/Model" in ln], out.stderr


CONFIG_APP = """
import logging
from shoal import serve

@serve.deployment
class Chatty:
    def __init__(self):
        logging.getLogger("ray.serve").debug("CHATTY-DEBUG %s", logging.getLogger("ray.serve").level)

    def __call__(self):
        return "ok"

app = Chatty.bind()
"""

CONFIG_FILE = """
logging_config:
  log_level: WARNING
applications:
  - name: quiet
    route_prefix: /quiet
    import_path: chatty:app
  - name: loud
    route_prefix: /loud
    import_path: chatty:app
    logging_config:
      log_level: DEBUG
"""


def test_config_file_logging_config_reaches_the_replicas(tmp_path):
    (tmp_path / "chatty.py").write_text(CONFIG_APP)
    (tmp_path / "serve.yaml").write_text(CONFIG_FILE)
    env = _env()
    env.pop("SHOAL_INSTANCE_DIR", None)
    run = subprocess.Popen([sys.executable, "-m", "shoal", "run", "serve.yaml", "--port", "0"], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _Output(run)
    try:
        out.wait_for("Application 'loud' is RUNNING", timeout=90)
        out.wait_for("Application 'quiet' is RUNNING", timeout=90)
        line = out.wait_for("CHATTY-DEBUG", timeout=30)  # the constructor's line, echoed
        assert line.startswith("(loud/Chatty ") and line.endswith(f"CHATTY-DEBUG {logging.DEBUG}"), line
    finally:
        _stop(run)
    assert not [ln for ln in out.text().splitlines() if "CHATTY-DEBUG" in ln and "(quiet/" in ln], out.text()


# --- 17: a driver named like a library -------------------------------------------------------------
LIBRARY_NAMED_DRIVER = """
import sys
from fastapi import FastAPI, WebSocket
from shoal import serve
from shoal.api import get_http_url

app = FastAPI()


@serve.deployment
@serve.ingress(app)
class EchoServer:
    @app.get("/")
    def root(self):
        {root_body}

    @app.websocket("/ws")
    async def echo(self, ws: WebSocket):
        await ws.accept()
        await ws.send_text(await ws.receive_text())


serve.run(EchoServer.bind())
print("URL", get_http_url(), flush=True)
sys.stdin.readline()  # until the test is done
serve.shutdown()
"""


@pytest.mark.parametrize("how", ["script", "module-beside-the-script"])
def test_a_user_file_named_like_a_library_does_not_shadow_it_in_shoal(tmp_path, how):
    """Ray's HTTP guide names its example `websockets.py`: the proxy (uvicorn) imports the real
    `websockets` library, the replica's user code gets the user's module (as in the driver)."""
    import httpx
    from websockets.sync.client import connect

    if how == "script":
        driver, body, expected = "websockets.py", 'return "ok"', "ok"
    else:
        # User code imports by name as the driver does: the user's module.
        driver, body, expected = "driver.py", "import websockets; return websockets.__file__", \
            str(tmp_path / "websockets.py")
        (tmp_path / "websockets.py").write_text("SHADOW = True\n")
    (tmp_path / driver).write_text(LIBRARY_NAMED_DRIVER.format(root_body=body))
    proc = subprocess.Popen([sys.executable, driver], cwd=tmp_path, env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _Output(proc)
    try:
        line = out.wait_for("URL ", timeout=90)
        url = line.split()[1]
        assert httpx.get(url + "/", timeout=30).json() == expected
        with connect(url.replace("http://", "ws://") + "/ws", open_timeout=30) as ws:
            ws.send("Eureka!")
            assert ws.recv(timeout=30) == "Eureka!"
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0, out.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_system_processes_get_the_user_dirs_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path / "scripts"), "/opt/lib", SRC, "/usr/lib/python3"])
    path = sessions.system_python_path()
    assert path[-2:] == [str(tmp_path), str(tmp_path / "scripts")]
    assert path.index(SRC) < path.index(str(tmp_path))
    env = sessions.system_env({"PYTHONSAFEPATH": ""})
    assert env["PYTHONSAFEPATH"] == "1" and env["PYTHONPATH"].split(os.pathsep) == path
    assert "PYTHONSAFEPATH" not in sessions.user_env(dict(env))  # replicas: the user's setting back
    assert sessions.user_env(sessions.system_env({"PYTHONSAFEPATH": "x"}))["PYTHONSAFEPATH"] == "x"
    # shoal imported from the working directory stays where it is.
    monkeypatch.chdir(SRC)
    monkeypatch.setattr(sys, "path", ["", "/opt/lib"])
    assert sessions.system_python_path() == [SRC, "/opt/lib"]


def test_drop_implicit_cwd_where_safe_path_is_unsupported(tmp_path, monkeypatch):
    class Flags:  # Python 3.10's sys.flags: no safe_path
        pass

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "flags", Flags())
    monkeypatch.setattr(sys, "path", [str(tmp_path), "/opt/lib", str(tmp_path)])
    sessions.drop_implicit_cwd()
    assert sys.path == ["/opt/lib", str(tmp_path)]  # the user's directory stays, last
    sessions.drop_implicit_cwd()
    assert sys.path == ["/opt/lib", str(tmp_path)]


# --- 18: one traceback per failed start -------------------------------------------------------------
FAILING_DRIVER = """
from shoal import serve

@serve.deployment(max_constructor_retry_count=2)
class Broken:
    def __init__(self):
        raise ValueError("broken-weights")

try:
    serve.run(Broken.bind())
except Exception as e:
    print("RAISED", type(e).__name__, flush=True)
    print(e, flush=True)
serve.shutdown()
"""


def test_constructor_failure_prints_one_traceback_per_attempt(tmp_path):
    (tmp_path / "driver.py").write_text(FAILING_DRIVER)
    out = subprocess.run([sys.executable, "driver.py"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=180)
    assert "RAISED DeployFailedError" in out.stdout, out.stdout + out.stderr
    text = out.stdout + out.stderr
    # Each replica's traceback once (its own output, echoed with its prefix) ...
    per_replica: dict = {}
    for m in re.finditer(r"^\(default/Broken replica=(\w+) pid=\d+\) Traceback", text, re.M):
        per_replica[m.group(1)] = per_replica.get(m.group(1), 0) + 1
    assert per_replica and all(n == 1 for n in per_replica.values()), text
    # ... the controller says which replica failed in one line, without repeating it ...
    warnings = re.findall(r"replica (\w+) of default#Broken failed to start: ValueError: broken-weights", text)
    assert set(warnings) <= set(per_replica) and warnings, text
    # ... and the only other traceback is the one in the error serve.run raised.
    unprefixed = [ln for ln in text.splitlines() if ln.startswith("Traceback (most recent call last)")]
    assert len(unprefixed) == 1, text


# --- 18: session directories ----------------------------------------------------------------------
def _make_session(root, name: str, age_s: float = 0.0) -> str:
    path = os.path.join(str(root), name)
    os.makedirs(os.path.join(path, "logs"))
    open(os.path.join(path, "logs", "controller.log"), "w").close()
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_sweep_removes_exited_sessions_only(tmp_path):
    old = [_make_session(tmp_path, f"s2020010{i}-000000-old{i}", age_s=3600 * (i + 1)) for i in range(3)]
    fresh = _make_session(tmp_path, "s20200201-000000-fresh")  # may be an instance still starting
    in_use = _make_session(tmp_path, "s20200301-000000-inuse", age_s=3600)
    owned = _make_session(tmp_path, "s20200401-000000-owned", age_s=3600)
    other = os.path.join(str(tmp_path), "instance")
    os.makedirs(other)
    # A process of the session names it on its command line (replicas, proxies, controller, supervisor).
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(120)", in_use + "/r/x.sock"])
    try:
        wait_for(lambda: in_use + "/r/x.sock" in psutil.Process(holder.pid).cmdline(), what="the process to start")
        sessions.record_driver(owned)  # a live driver owns it (its controller may be restarting)
        os.utime(owned, (time.time() - 3600, time.time() - 3600))
        removed = sessions.sweep_exited_sessions(str(tmp_path), keep=1)
        # The newest exited one is kept (for its logs); the older exited ones go.
        assert sorted(removed) == sorted(old[1:])
        assert os.path.isdir(old[0]) and os.path.isdir(fresh) and os.path.isdir(in_use) and os.path.isdir(owned)
        assert os.path.isdir(other)
        assert sessions.sweep_exited_sessions(str(tmp_path), keep=0) == [old[0]]
    finally:
        holder.kill()
        holder.wait()
    # Its process gone, the session is exited too.
    assert sessions.sweep_exited_sessions(str(tmp_path), keep=0) == [in_use]


SESSION_DRIVER = """
import os, sys, time
from shoal import serve
from shoal.client import get_global_client

serve.start()
print("SESSION", get_global_client().session_dir, flush=True)
old = os.environ.get("OLD_SESSION")  # (not on the command line: that would count as a process of it)
if old:
    deadline = time.monotonic() + 60
    while os.path.exists(old) and time.monotonic() < deadline:
        time.sleep(0.1)
    print("OLD-GONE" if not os.path.exists(old) else "OLD-KEPT", flush=True)
serve.shutdown()
"""


def test_an_exited_drivers_session_is_removed_by_the_next_start(tmp_path):
    (tmp_path / "driver.py").write_text(SESSION_DRIVER)
    env = dict(_env(), **{sessions.KEEP_ENV: "0"})
    first = subprocess.run([sys.executable, "driver.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    session = re.search(r"^SESSION (\S+)", first.stdout, re.M).group(1)
    assert os.path.isdir(session)
    info = sessions.read_driver(session)
    assert info is not None and not info.alive() and "driver.py" in info.command
    old = time.time() - 2 * sessions.GRACE_S
    os.utime(session, (old, old))
    second = subprocess.run([sys.executable, "driver.py"], cwd=tmp_path, env=dict(env, OLD_SESSION=session),
                            capture_output=True, text=True, timeout=120)
    assert "OLD-GONE" in second.stdout, second.stdout + second.stderr


# --- 18: `shoal status` finds a `shoal run` instance ------------------------------------------------
def test_shoal_status_finds_a_shoal_run_instance(tmp_path):
    (tmp_path / "statusapp.py").write_text(textwrap.dedent("""
        from shoal import serve

        @serve.deployment
        class Hello:
            def __call__(self):
                return "hi"

        app = Hello.bind()
    """))
    env = _env()
    env.pop("SHOAL_INSTANCE_DIR", None)  # (an explicit instance dir means a detached instance)
    run = subprocess.Popen([sys.executable, "-m", "shoal", "run", "statusapp:app", "--name", "statusapp", "--port",
                            "0"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _Output(run)
    try:
        output.wait_for("Press Ctrl-C to stop.", timeout=90)
        out = subprocess.run([sys.executable, "-m", "shoal", "status", "-o", "json", "--pid", str(run.pid)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        assert data["applications"]["statusapp"]["status"] == "RUNNING"
        assert data["applications"]["statusapp"]["deployments"]["Hello"]["status"] == "HEALTHY"
        assert f"pid {run.pid}" in out.stderr and "shoal run statusapp:app" in out.stderr
        table = subprocess.run([sys.executable, "-m", "shoal", "status", "--pid", str(run.pid)], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0 and "statusapp" in table.stdout, table.stdout + table.stderr
        # Without --pid: the detached instance if one runs, else the newest driver's (maybe not ours).
        plain = subprocess.run([sys.executable, "-m", "shoal", "status"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode == 0, plain.stdout + plain.stderr
        # An explicit instance directory means a detached instance only.
        explicit = subprocess.run([sys.executable, "-m", "shoal", "status"], cwd=tmp_path, timeout=60,
                                  env=dict(env, SHOAL_INSTANCE_DIR=str(tmp_path / "none")), capture_output=True,
                                  text=True)
        assert explicit.returncode == 1 and "shoal start" in explicit.stderr
        # Reading the status changed nothing: the instance still serves.
        assert serve_status_of(run.pid, tmp_path, env)["applications"]["statusapp"]["status"] == "RUNNING"
    finally:
        _stop(run)
    missing = subprocess.run([sys.executable, "-m", "shoal", "status", "--pid", str(run.pid)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and f"pid {run.pid}" in missing.stderr


def serve_status_of(pid: int, cwd, env) -> dict:
    out = subprocess.run([sys.executable, "-m", "shoal", "status", "-o", "json", "--pid", str(pid)], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# --- 15: shutdown_async (last: it stops the module's instance) ---------------------------------------
def test_shutdown_async_stops_shoal_from_async_code(serve_instance):
    from shoal.client import get_global_client

    serve.run(Echo.bind(), name="bye", route_prefix="/bye")
    controller = psutil.Process(get_global_client().controller_proc.pid)

    async def main():
        ticks = 0

        async def tick():  # the loop keeps running while shoal stops
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(tick())
        await serve.shutdown_async()
        t.cancel()
        return ticks

    assert asyncio.run(main()) > 0
    assert serve.status().applications == {}
    controller.wait(timeout=30)


# --- helpers --------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [SRC, env.get("PYTHONPATH", "")] if p)
    return env


class _Output:
    """Collects a process's output lines in a thread (a full pipe would block the process)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, fragment: str, timeout: float) -> str:
        """The first line containing `fragment`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if fragment in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    raise AssertionError(f"no line with {fragment!r} within {timeout}s (exit code {self.proc.poll()});"
                                         f" got:\n" + "\n".join(self.lines))
                self.cond.wait(min(left, 0.2))

    def text(self) -> str:
        self.thread.join(10)
        with self.cond:
            return "\n".join(self.lines)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_package_lists_the_public_names_it_loads_lazily():
    """`shoal`'s lazy attributes are exactly `shoal.serve`'s public names, and shoal's own processes
    import their modules without loading the public API."""
    import subprocess
    import sys

    import shoal

    assert shoal._PUBLIC == set(serve.__all__)
    code = ("import sys, shoal.http.proxy, shoal.replica.server, shoal.controller.__main__; "
            "print('shoal.serve' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
