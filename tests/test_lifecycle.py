"""Deployments' lifecycle on real processes: constructors, reconfigure, health, teardown, apps, status."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest

from shoal import serve
from shoal.exceptions import DeployFailedError

from conftest import wait_for


def test_async_init_and_reconfigure(serve_app):
    @serve.deployment(user_config={"greeting": "hi"})
    class Greeter:
        async def __init__(self, name):
            import asyncio

            await asyncio.sleep(0.01)
            self.name = name

        def reconfigure(self, config):
            self.greeting = config["greeting"]

        def __call__(self):
            return f"{self.greeting} {self.name}"

    h = serve.run(Greeter.bind("ann"))
    assert h.remote().result() == "hi ann"
    # A user_config change reconfigures the running replica in place (no restart).
    h = serve.run(Greeter.options(user_config={"greeting": "hello"}).bind("ann"))
    assert h.remote().result() == "hello ann"


def test_user_config_change_does_not_restart(serve_app):
    # With a `version`, a redeploy of the same version applies a user_config change in place. (Without
    # one, every serve.run is new code and replaces the replicas, as in Ray: test_ray_parity_deploy.py.)
    @serve.deployment(user_config={"v": 1}, version="1")
    class C:
        def reconfigure(self, config):
            self.v = config["v"]

        def __call__(self):
            return os.getpid(), self.v

    h = serve.run(C.bind())
    pid, v = h.remote().result()
    assert v == 1
    h = serve.run(C.options(user_config={"v": 2}).bind())
    assert h.remote().result() == (pid, 2)


def test_code_change_replaces_replicas(serve_app):
    @serve.deployment
    class V:
        def __init__(self, version):
            self.version = version

        def __call__(self):
            return os.getpid(), self.version

    h = serve.run(V.bind(1))
    pid1, v1 = h.remote().result()
    h = serve.run(V.bind(2))
    pid2, v2 = h.remote().result()
    assert (v1, v2) == (1, 2) and pid1 != pid2
    wait_for(lambda: sum(serve.status().applications["default"].deployments["V"].replica_states.values()) == 1,
             what="the old replica to stop")


def test_user_config_without_reconfigure_fails_deploy(serve_app):
    @serve.deployment(user_config={"a": 1})
    class NoReconfigure:
        pass

    with pytest.raises(DeployFailedError, match="reconfigure"):
        serve.run(NoReconfigure.bind())


def test_constructor_failure_raises_with_traceback_and_shows_in_status(serve_app):
    @serve.deployment
    class Broken:
        def __init__(self):
            raise ZeroDivisionError("the constructor is broken")

    with pytest.raises(DeployFailedError) as exc:
        serve.run(Broken.bind(), name="broken")
    assert "ZeroDivisionError: the constructor is broken" in str(exc.value)
    assert "Traceback" in str(exc.value)
    app = serve.status().applications["broken"]
    assert app.status == serve.ApplicationStatus.DEPLOY_FAILED
    dep = app.deployments["Broken"]
    assert dep.status == serve.DeploymentStatus.DEPLOY_FAILED
    assert dep.status_trigger == serve.DeploymentStatusTrigger.REPLICA_STARTUP_FAILED
    assert "the constructor is broken" in dep.message


def test_health_check_failure_replaces_replica(serve_app, tmp_path):
    flag = tmp_path / "unhealthy"

    @serve.deployment(health_check_period_s=0.1, health_check_timeout_s=1)
    class H:
        def check_health(self):
            if flag.exists() and os.getpid() == int(flag.read_text()):
                raise RuntimeError("unhealthy on purpose")

        def __call__(self):
            return os.getpid()

    h = serve.run(H.bind())
    pid = h.remote().result()
    flag.write_text(str(pid))
    # Calls queue while the replacement starts (the unhealthy one left the replica set): that start-up
    # can take many seconds on a loaded machine, so each call gets a generous time-out.
    wait_for(lambda: h.remote().result(timeout_s=60) != pid, timeout=120, what="replacement of the unhealthy replica")


def test_del_runs_on_delete_and_shutdown(serve_app, tmp_path):
    marker = tmp_path / "deleted"

    @serve.deployment
    class D:
        async def __del__(self):
            marker.write_text("bye")

        def __call__(self):
            return 1

    serve.run(D.bind(), name="d", route_prefix="/d").remote().result()
    serve.delete("d")
    assert marker.read_text() == "bye"
    assert "d" not in serve.status().applications


def test_multiple_apps_replace_and_delete(serve_app):
    @serve.deployment
    class A:
        def __init__(self, tag):
            self.tag = tag

        def __call__(self):
            return self.tag

    ha = serve.run(A.bind("a"), name="app_a", route_prefix="/a")
    hb = serve.run(A.bind("b"), name="app_b", route_prefix="/b")
    assert (ha.remote().result(), hb.remote().result()) == ("a", "b")
    assert set(serve.status().applications) == {"app_a", "app_b"}
    # Same name: the application is replaced.
    ha2 = serve.run(A.bind("a2"), name="app_a", route_prefix="/a")
    assert ha2.remote().result() == "a2"
    assert serve.get_app_handle("app_b").remote().result() == "b"
    assert serve.get_deployment_handle("A", "app_a").remote().result() == "a2"
    with pytest.raises(serve.RayServeException, match="Prefix /a is being used"):
        serve.run(A.bind("c"), name="app_c", route_prefix="/a")
    serve.delete("app_a")
    serve.delete("app_a")  # idempotent
    assert set(serve.status().applications) == {"app_b"}
    with pytest.raises(serve.RayServeException, match="does not exist"):
        serve.get_app_handle("app_a")
    with pytest.raises(serve.RayServeException, match="does not exist"):
        serve.get_deployment_handle("Nope", "app_b")
    with pytest.raises(serve.RayServeException, match="application name"):
        serve.get_deployment_handle("A")


def test_replacing_app_removes_dropped_deployments(serve_app):
    @serve.deployment
    class Leaf:
        def __call__(self):
            return "leaf"

    @serve.deployment
    class Root:
        def __init__(self, leaf=None):
            self.leaf = leaf

        async def __call__(self):
            return await self.leaf.remote() if self.leaf else "alone"

    assert serve.run(Root.bind(Leaf.bind())).remote().result() == "leaf"
    assert serve.run(Root.bind()).remote().result() == "alone"
    wait_for(lambda: set(serve.status().applications["default"].deployments) == {"Root"})


def test_status_shape(serve_app):
    @serve.deployment(num_replicas=2)
    class S:
        def __call__(self):
            return 1

    serve.run(S.bind(), name="s", route_prefix="/s")
    st = serve.status()
    app = st.applications["s"]
    assert app.status == serve.ApplicationStatus.RUNNING
    assert app.last_deployed_time_s > 0
    dep = app.deployments["S"]
    assert dep.status == serve.DeploymentStatus.HEALTHY
    assert dep.replica_states == {serve.ReplicaState.RUNNING: 2}
    d = st.to_dict()
    assert d["applications"]["s"]["status"] == "RUNNING"
    assert d["applications"]["s"]["deployments"]["S"]["replica_states"] == {"RUNNING": 2}


def test_replicas_share_load(serve_app):
    @serve.deployment(num_replicas=2)
    class P:
        async def __call__(self):
            import asyncio

            await asyncio.sleep(0.01)
            return os.getpid()

    h = serve.run(P.bind())
    pids = {r.result() for r in [h.remote() for _ in range(40)]}
    assert len(pids) == 2


def test_replica_context(serve_app):
    @serve.deployment
    class Ctx:
        def __call__(self):
            c = serve.get_replica_context()
            return c.app_name, c.deployment, c.replica_tag, type(c.servable_object).__name__

    app, dep, tag, cls = serve.run(Ctx.bind(), name="ctx", route_prefix="/ctx").remote().result()
    assert (app, dep, cls) == ("ctx", "Ctx", "Ctx") and tag


def test_get_deployment_handle_inside_replica_defaults_to_own_app(serve_app):
    @serve.deployment
    class Target:
        def __call__(self):
            return "target"

    @serve.deployment
    class Caller:
        def __init__(self, target):
            pass

        def __call__(self):
            return serve.get_deployment_handle("Target").remote().result()

    assert serve.run(Caller.bind(Target.bind()), name="x", route_prefix="/x").remote().result() == "target"


def test_replica_output_goes_to_a_log_file(serve_app):
    @serve.deployment
    class Loud:
        def __call__(self):
            import logging

            print("printed-line-123", flush=True)
            logging.getLogger("user").warning("logged-line-456")
            return os.getpid()

    serve.run(Loud.bind(), name="loud", route_prefix="/loud").remote().result()
    from shoal.client import get_global_client

    logs = os.path.join(get_global_client().session_dir, "logs")

    def found():
        files = [f for f in os.listdir(logs) if f.startswith("replica_loud_Loud_")]
        text = "".join(open(os.path.join(logs, f)).read() for f in files)
        return "printed-line-123" in text and "logged-line-456" in text

    wait_for(found, what="the replica's output in its log file")


def test_replica_pending_resources_reports_what_is_missing(serve_app):
    @serve.deployment(ray_actor_options={"num_cpus": 512})
    class Huge:
        def __call__(self):
            return 1

    errors = []

    def deploy():
        try:
            serve.run(Huge.bind(), name="huge", route_prefix="/huge")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=deploy)
    t.start()

    def pending_message():
        app = serve.status().applications.get("huge")
        return app and app.status == serve.ApplicationStatus.DEPLOYING and "cannot be placed" in \
            app.deployments["Huge"].message and "CPU: 512" in app.deployments["Huge"].message

    wait_for(pending_message, what="a status message naming the missing CPUs")
    serve.delete("huge")
    t.join(timeout=20)
    assert not t.is_alive() and errors  # serve.run returned with an error instead of hanging


def test_classes_from_main_reach_replicas_by_value(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent("""
        from shoal import serve

        class Payload:
            def __init__(self, v):
                self.v = v

        @serve.deployment
        class Model:
            def __call__(self, p):
                return Payload(p.v * 2)

        h = serve.run(Model.bind())
        print("RESULT", h.remote(Payload(21)).result().v)
        serve.shutdown()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "RESULT 42" in out.stdout, out.stderr


def test_sync_constructor_runs_on_the_replica_loop(serve_app):
    """As in Ray Serve 2.60: a sync `__init__` runs on the replica's event-loop thread, so it can use
    `asyncio.get_running_loop()` (here: a background task); it calls other deployments with `.remote()`
    and awaits the response later, a blocking `.result()` being refused there as on any running loop.
    Sync methods still run in the thread pool."""

    @serve.deployment
    class Config:
        def get(self):
            return {"threshold": 3}

    @serve.deployment
    class Uses:
        def __init__(self, config):
            import asyncio

            self.loop = asyncio.get_running_loop()
            self.init_thread = threading.get_ident()
            self.ticks = 0
            self.ticker = self.loop.create_task(self._tick())
            self.pending = config.get.remote()
            try:
                config.get.remote().result()
                self.blocking = "allowed"
            except RuntimeError as e:
                self.blocking = str(e)

        async def _tick(self):
            import asyncio

            while True:
                self.ticks += 1
                await asyncio.sleep(0.01)

        async def __call__(self):
            import asyncio

            on_init_loop = asyncio.get_running_loop() is self.loop and threading.get_ident() == self.init_thread
            return (await self.pending)["threshold"], on_init_loop, self.blocking

        def sync_method_thread(self):
            return threading.get_ident() != self.init_thread

        def ticks_so_far(self):
            return self.ticks

    h = serve.run(Uses.bind(Config.bind()))
    threshold, on_init_loop, blocking = h.remote().result()
    assert threshold == 3 and on_init_loop
    assert "Sync methods should not be called from within an `asyncio` event loop" in blocking
    assert h.sync_method_thread.remote().result() is True
    wait_for(lambda: h.ticks_so_far.remote().result() > 2, what="the task started in __init__ to run")


def test_constructor_traceback_names_the_users_file(serve_app, tmp_path, monkeypatch):
    (tmp_path / "user_model.py").write_text(
        "from shoal import serve\n\n"
        "@serve.deployment\n"
        "class Model:\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('bad weights')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_model

    with pytest.raises(DeployFailedError) as exc:
        serve.run(user_model.Model.bind(), name="tb", route_prefix="/tb")
    assert "user_model.py" in str(exc.value) and "bad weights" in str(exc.value)


def test_blocking_run_shuts_down_on_sigterm(tmp_path):
    import signal

    script = tmp_path / "blocking.py"
    started, drained = tmp_path / "started", tmp_path / "drained"
    script.write_text(textwrap.dedent(f"""
        from shoal import serve

        @serve.deployment(health_check_period_s=0.1)
        class D:
            def check_health(self):  # runs once the replica is RUNNING
                open({str(started)!r}, "w").write("up")

            def __del__(self):
                open({str(drained)!r}, "w").write("drained")

        serve.run(D.bind(), blocking=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    wait_for(started.exists, timeout=60, what="the replica to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert drained.read_text() == "drained"  # graceful: the replica ran __del__


def test_light_option_changes_reconfigure_in_place(serve_app):
    @serve.deployment(max_ongoing_requests=2, autoscaling_config={"min_replicas": 1, "max_replicas": 2}, version="1")
    class Light:
        def __call__(self):
            return os.getpid()

    h = serve.run(Light.bind(), name="light", route_prefix="/light")
    pid = h.remote().result()
    h = serve.run(Light.options(max_ongoing_requests=7, autoscaling_config={"min_replicas": 1, "max_replicas": 3,
                                                                          "upscale_delay_s": 5}).bind(),
                  name="light", route_prefix="/light")
    assert h.remote().result() == pid  # same process: reconfigured, not restarted
    from shoal.client import get_global_client

    # Routers learned the new limit.
    wait_for(lambda: any(e.max_ongoing == 7 for r in get_global_client()._routers.get(h.deployment_id, ())
                         for e in r.ready))
