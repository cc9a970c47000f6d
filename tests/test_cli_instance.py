"""A detached instance driven through the CLI as a user would: `shoal start`, `deploy`, `status`,
`config`, `shutdown`, over real processes and ports; and the admin API's guard (token, loopback).

Every test uses its own instance directory, so parallel test runs never share an instance, and the
"nothing left behind" checks look only at the processes of the instance the test started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from typing import Optional

import httpx
import psutil
import pytest
from click.testing import CliRunner

from conftest import wait_for
from shoal import cli
from test_cli import _alive, _env, _shoal_cmd, _wait_all_gone

CLI_TIMEOUT_S = 120

APP_MODULE = """
import os
import time

from pydantic import BaseModel

from shoal import serve

GATE = {gate!r}


@serve.deployment
class Greeter:
    def __init__(self, greeting="hello"):
        while not os.path.exists(GATE):  # the test opens the gate: "deploying" lasts as long as it needs
            time.sleep(0.05)
        self.greeting = greeting
        self.config = None

    def reconfigure(self, config):
        self.config = config

    def __call__(self, request):
        return {{"greeting": self.greeting, "config": self.config, "pid": os.getpid()}}


app = Greeter.bind()


@serve.deployment(max_constructor_retry_count=2)
class Broken:
    def __init__(self):
        raise RuntimeError("boom-in-constructor")


broken = Broken.bind()


class Args(BaseModel):
    greeting: str
    times: int = 1


def typed_builder(args: Args):
    return Greeter.bind(args.greeting * args.times)
"""

CONFIG = """
applications:
- name: greet
  route_prefix: /greet
  import_path: instapp:app
  runtime_env: {{working_dir: "s3://bucket/code.zip"}}
  deployments:
  - name: Greeter
    num_replicas: {replicas}
    user_config: {{level: {level}}}
"""


class Instance:
    """One detached instance in a private directory, driven through the `shoal` command."""

    def __init__(self, workdir) -> None:
        self.workdir = workdir
        self.dir = str(workdir / "instance")
        self.env = dict(_env(), SHOAL_INSTANCE_DIR=self.dir, SHOAL_HTTP_PORT="0")

    def cli(self, *args: str, input: Optional[str] = None, check: Optional[int] = 0) -> subprocess.CompletedProcess:
        done = subprocess.run(_shoal_cmd() + list(args), cwd=str(self.workdir), env=self.env, input=input,
                              capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        if check is not None:
            assert done.returncode == check, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def write(self, name: str, text: str) -> str:
        (self.workdir / name).write_text(textwrap.dedent(text))
        return name

    @property
    def info(self) -> dict:
        with open(os.path.join(self.dir, "instance.json")) as f:
            info = json.load(f)
        # Kept for `stop_instance`: a restarting controller may not have rewritten the file yet.
        self.last_info = info
        return info

    @property
    def token(self) -> str:
        with open(os.path.join(self.dir, "token")) as f:
            return f.read().strip()

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, self.info["admin_url"] + path, headers=headers, timeout=30, **kwargs)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--output", "json").stdout)

    def http_url(self) -> str:
        return self.admin("GET", "/api/serve/applications/").json()["http_url"]

    def processes(self) -> list[psutil.Process]:
        """The controller and the processes it started (the supervisor, its parent, is not included)."""
        controller = psutil.Process(self.info["pid"])
        return [controller, *controller.children(recursive=True)]

    def replica_pids(self) -> set[int]:
        return {p.pid for p in self.processes() if "shoal.replica.server" in " ".join(p.cmdline())}

    def open_gate(self) -> None:
        (self.workdir / "gate").write_text("open")


@pytest.fixture
def inst(tmp_path):
    instance = Instance(tmp_path)
    instance.write("instapp.py", APP_MODULE.format(gate=str(tmp_path / "gate")))
    yield instance
    stop_instance(instance)


def stop_instance(instance: Instance) -> None:
    """Stop whatever a test left running: the supervisor first (it would restart the controller), then
    every process of the instance's session (adopted replicas and proxies are nobody's children)."""
    try:
        info = instance.info
    except (OSError, ValueError):  # none, or a restarted controller has not rewritten it yet
        info = getattr(instance, "last_info", None)
        if info is None:
            return
    # By session directory (every process of it names it on its command line), never by a pid that a
    # process which exited meanwhile may have passed on.
    for supervisor_only in (True, False):
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or [])
                if info["session_dir"] in cmdline and (not supervisor_only or "shoal.supervisor" in cmdline):
                    p.kill()
            except psutil.Error:
                pass


def _get(url: str) -> dict:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_start_deploy_status_update_shutdown(inst):
    started = inst.cli("start")
    assert "Started a detached shoal instance" in started.stdout, started.stdout
    # The command returned; the instance runs on, in its own directory (0700) with a 0600 token.
    assert _alive(psutil.Process(inst.info["pid"]))
    assert stat.S_IMODE(os.stat(inst.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(inst.dir, "token")).st_mode) == 0o600
    again = inst.cli("start")
    assert "already running" in again.stdout
    assert inst.status()["applications"] == {}

    # Deploy: the CLI shows progress while the constructor waits for the gate.
    inst.write("v1.yaml", CONFIG.format(replicas=1, level=1))
    deploy = subprocess.Popen(_shoal_cmd() + ["deploy", "v1.yaml"], cwd=str(inst.workdir), env=inst.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in deploy.stdout), daemon=True)
    reader.start()
    wait_for(lambda: any("greet/Greeter: UPDATING, 1 starting" in line for line in list(lines)),
             timeout=60, what="progress line for the starting replica")
    deploying = inst.status()["applications"]["greet"]
    assert deploying["status"] == "DEPLOYING"
    assert deploying["deployments"]["Greeter"]["replica_states"] == {"STARTING": 1}
    table = inst.cli("status").stdout
    assert "greet" in table and "DEPLOYING" in table and "1 starting" in table, table
    inst.open_gate()
    assert deploy.wait(CLI_TIMEOUT_S) == 0, "\n".join(lines)
    reader.join(5)
    out = "\n".join(lines)
    assert "greet/Greeter: HEALTHY, 1 running" in out and "All applications are RUNNING." in out, out
    assert "runtime_env: ignored" in out, out  # Ray-only fields: accepted, with a warning

    running = inst.status()
    assert running["applications"]["greet"]["status"] == "RUNNING"
    assert running["applications"]["greet"]["deployments"]["Greeter"]["status"] == "HEALTHY"
    assert set(running["proxies"].values()) == {"HEALTHY"}
    url = inst.http_url() + "/greet"
    first = wait_for(lambda: _get(url), what="the app to answer over HTTP")
    assert first["config"] == {"level": 1}
    [old_pid] = inst.replica_pids()
    as_yaml = inst.cli("status", "-o", "yaml").stdout
    assert "status: RUNNING" in as_yaml and "RUNNING: 1" in as_yaml, as_yaml

    # Update num_replicas and user_config through the file: the running replica is reconfigured in
    # place (same process), one more starts.
    inst.write("v2.yaml", CONFIG.format(replicas=2, level=2))
    inst.cli("deploy", "v2.yaml")
    assert inst.status()["applications"]["greet"]["deployments"]["Greeter"]["replica_states"] == {"RUNNING": 2}
    pids = inst.replica_pids()
    assert old_pid in pids and len(pids) == 2
    answers = [_get(url) for _ in range(30)]
    assert {a["pid"] for a in answers} <= pids
    assert all(a["config"] == {"level": 2} for a in answers), answers

    shown = inst.cli("config").stdout
    assert "import_path: instapp:app" in shown and "num_replicas: 2" in shown, shown

    # Shutdown asks first; "no" changes nothing.
    processes = inst.processes() + [psutil.Process(inst.info["supervisor_pid"])]
    assert len(processes) == 6  # controller, proxy, standby proxy, two replicas, supervisor
    refused = inst.cli("shutdown", input="n\n", check=1)
    assert "Continue?" in refused.stdout and "Aborted" in refused.stderr
    assert all(_alive(p) for p in processes)
    inst.cli("shutdown", "-y")
    _wait_all_gone(processes, timeout=30)
    assert not os.path.exists(os.path.join(inst.dir, "instance.json"))
    gone = inst.cli("status", check=1)
    assert "no shoal instance is running" in gone.stderr


BAD_CONFIGS = {
    "unknown-field": ("""
        applications:
        - name: greet
          route_prefix: /greet
          import_path: instapp:app
          deployments:
          - name: Greeter
            num_replica: 2
        """, "applications[0].deployments[0].num_replica: unknown field"),
    "wrong-type": ("""
        applications:
        - name: greet
          route_prefix: /greet
          import_path: instapp:app
          deployments:
          - name: Greeter
            max_ongoing_requests: lots
        """, "applications[0].deployments[0].max_ongoing_requests: Input should be a valid integer"),
    "duplicate-route": ("""
        applications:
        - name: greet
          route_prefix: /greet
          import_path: instapp:app
        - name: other
          route_prefix: /greet
          import_path: instapp:app
        """, "applications[1].route_prefix: route prefix already used by applications[0]"),
    "import-fails": ("""
        applications:
        - name: greet
          route_prefix: /greet
          import_path: no_such_module_xyz:app
        """, "applications[0].import_path: Could not import 'no_such_module_xyz:app': module "
             "'no_such_module_xyz' not found"),
    "builder-args": ("""
        applications:
        - name: greet
          route_prefix: /greet
          import_path: instapp:typed_builder
          args: {times: 2}
        """, "applications[0].args.greeting: Field required"),
}


def test_rejected_configs_leave_running_apps_untouched(inst):
    inst.open_gate()
    inst.cli("start")
    inst.write("good.yaml", CONFIG.format(replicas=1, level=7))
    inst.cli("deploy", "good.yaml")
    url = inst.http_url() + "/greet"
    before = wait_for(lambda: _get(url), what="the app to answer")
    deployed_at = inst.status()["applications"]["greet"]["last_deployed_time_s"]
    for case, (text, reason) in BAD_CONFIGS.items():
        name = inst.write(f"{case}.yaml", text)
        done = inst.cli("deploy", name, check=1)
        assert f"Error: {name}: {reason}" in done.stderr, (case, done.stderr)
        assert "Traceback" not in done.stderr
        # The instance also refuses the body on its own (the REST API validates, not only the CLI).
        if case in ("unknown-field", "wrong-type", "duplicate-route"):
            import yaml

            r = inst.admin("PUT", "/api/serve/applications/", json=yaml.safe_load(textwrap.dedent(text)))
            assert r.status_code == 400 and any(reason in e for e in r.json()["errors"]), r.text
    after = inst.status()["applications"]
    assert list(after) == ["greet"] and after["greet"]["status"] == "RUNNING"
    assert after["greet"]["last_deployed_time_s"] == deployed_at
    assert _get(url) == before  # same replica, same config

    # A config that builds but whose constructor fails: progress ends with the reason, exit 1.
    inst.write("broken.yaml", """
        applications:
        - name: broken
          route_prefix: /broken
          import_path: instapp:broken
        """)
    failed = inst.cli("deploy", "broken.yaml", check=1)
    # (The "failed to start (1 of 2 attempts); retrying" line between them may fall between two polls.)
    assert any(line.startswith("broken/Broken: UPDATING") for line in failed.stdout.splitlines()), failed.stdout
    assert "broken: DEPLOY_FAILED" in failed.stdout and "RuntimeError: boom-in-constructor" in failed.stdout, \
        failed.stdout
    # Declarative: `greet` is not in that file, so it was deleted.
    assert list(inst.status()["applications"]) == ["broken"]

    # A typed builder gets its args validated into its pydantic model.
    inst.write("typed.yaml", """
        applications:
        - name: greet
          route_prefix: /greet
          import_path: instapp:typed_builder
          args: {greeting: "yo", times: 2}
        """)
    inst.cli("deploy", "typed.yaml")
    assert list(inst.status()["applications"]) == ["greet"]
    assert wait_for(lambda: _get(url))["greeting"] == "yoyo"
    inst.cli("shutdown", "-y")


def _non_loopback_address() -> Optional[str]:
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_admin_api_needs_token_and_loopback(inst):
    inst.cli("start")
    url = inst.info["admin_url"]
    assert url.startswith("http://127.0.0.1:")
    assert httpx.get(url + "/api/serve/status").status_code == 401
    wrong = httpx.get(url + "/api/serve/status", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert httpx.delete(url + "/api/serve/applications/").status_code == 401
    assert httpx.put(url + "/api/serve/applications/", json={"applications": []}).status_code == 401
    assert inst.admin("GET", "/api/serve/status").status_code == 200
    address = _non_loopback_address()
    if address is not None:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{address}:{port}/api/serve/status", timeout=5)
    processes = inst.processes()
    inst.cli("shutdown", "-y")
    _wait_all_gone(processes, timeout=30)


def test_commands_without_instance(inst):
    for args in (["status"], ["config"], ["deploy", "x.yaml"]):
        if args[0] == "deploy":
            inst.write("x.yaml", CONFIG.format(replicas=1, level=1))
        done = inst.cli(*args, check=1)
        assert "no shoal instance is running" in done.stderr, (args, done.stderr)
    assert "No shoal instance is running" in inst.cli("shutdown", "-y").stdout


# --- `shoal run` with a config file, builder arguments and --reload ---------------------------------
class _Run:
    def __init__(self, args: list[str], inst: Instance) -> None:
        self.popen = subprocess.Popen(_shoal_cmd() + args, cwd=str(inst.workdir), env=inst.env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(x.rstrip() for x in self.popen.stdout), daemon=True).start()

    def wait_for(self, fragment: str, count: int = 1) -> None:
        wait_for(lambda: sum(fragment in line for line in list(self.lines)) >= count or self.popen.poll() is not None,
                 timeout=90, what=fragment)
        assert sum(fragment in line for line in list(self.lines)) >= count, "\n".join(self.lines)

    def url(self, prefix: str) -> str:
        line = next(x for x in list(self.lines) if "is RUNNING" in x and " at http" in x and prefix in x)
        return line.split(" at ", 1)[1].split(". Press", 1)[0]

    def stop(self) -> str:
        tree = [psutil.Process(self.popen.pid), *psutil.Process(self.popen.pid).children(recursive=True)]
        self.popen.send_signal(signal.SIGINT)
        assert self.popen.wait(60) == 0, "\n".join(self.lines)
        _wait_all_gone(tree, timeout=30)
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)


def test_run_config_file_with_reload(inst):
    inst.open_gate()
    inst.write("two.yaml", """
        applications:
        - name: one
          route_prefix: /one
          import_path: instapp:app
          deployments:
          - name: Greeter
            user_config: {n: 1}
        - name: two
          route_prefix: /two
          import_path: instapp:typed_builder
          args: {greeting: "hey"}
        """)
    run = _Run(["run", "two.yaml", "--reload"], inst)
    try:
        run.wait_for("Press Ctrl-C to stop.", count=2)
        assert _get(run.url("/one"))["config"] == {"n": 1}
        assert _get(run.url("/two"))["greeting"] == "hey"
        # Editing the config redeploys: user_config reconfigures the running replica in place.
        one_pid = _get(run.url("/one"))["pid"]
        text = (inst.workdir / "two.yaml").read_text().replace("{n: 1}", "{n: 2}")
        (inst.workdir / "two.yaml").write_text(text)
        run.wait_for("redeploying")
        wait_for(lambda: _get(run.url("/one"))["config"] == {"n": 2}, timeout=60, what="reloaded config")
        assert _get(run.url("/one"))["pid"] == one_pid
        # Editing the code restarts the replicas with the new code.
        code = (inst.workdir / "instapp.py").read_text().replace('"greeting": self.greeting',
                                                                 '"greeting": self.greeting.upper()')
        (inst.workdir / "instapp.py").write_text(code)
        wait_for(lambda: _get(run.url("/two"))["greeting"] == "HEY", timeout=60, what="reloaded code")
        out = run.stop()
        assert "Got SIGINT; shutting down." in out and "Traceback" not in out, out
    finally:
        run.kill()


def test_run_import_path_with_typed_args(inst):
    inst.open_gate()
    run = _Run(["run", "instapp:typed_builder", "greeting=ho", "times=3"], inst)
    try:
        run.wait_for("Press Ctrl-C to stop.")
        assert _get(run.url("/"))["greeting"] == "hohoho"
        run.stop()
    finally:
        run.kill()


@pytest.mark.parametrize("args, fragment", [
    (["run", "instapp:typed_builder", "times=x"], "args.times: Input should be a valid integer"),
    (["run", "instapp:typed_builder", "nonsense"], "Invalid argument 'nonsense': expected key=value"),
])
def test_run_argument_errors(inst, args, fragment):
    done = inst.cli(*args, check=None)
    assert done.returncode in (1, 2) and fragment in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_build_writes_a_config_that_deploys(inst, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(inst.workdir)
    result = CliRunner().invoke(cli.main, ["build", "instapp:app", "-o", "built.yaml"])
    assert result.exit_code == 0, result.output
    text = (inst.workdir / "built.yaml").read_text()
    assert text.startswith("# This file was generated using the `shoal build` command.")
    from shoal.schema import load_config_file

    schema = load_config_file(inst.workdir / "built.yaml")
    assert [a.import_path for a in schema.applications] == ["instapp:app"]
    assert schema.applications[0].deployments[0].name == "Greeter"
    sys.modules.pop("instapp", None)
