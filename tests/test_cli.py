"""The `shoal` command line, and that shoal leaves no process behind however its driver ends.

These tests start real processes: the CLI (or a driver script), its controller and replicas.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Iterable

import psutil
import pytest

from conftest import wait_for
from click.testing import CliRunner

import shoal
from shoal import cli, import_path
from shoal.deployment import Application

STARTUP_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 30
RUNNING_LINE = "Press Ctrl-C to stop."
CONSTRUCTED = "GREETER-CONSTRUCTED"

APP_MODULE = f"""
from shoal import serve


@serve.deployment
class Greeter:
    def __init__(self, greeting="hello"):
        self.greeting = greeting
        print("{CONSTRUCTED}", flush=True)

    def __call__(self, name="world"):
        return f"{{self.greeting}} {{name}}"


app = Greeter.bind()


def build():
    return Greeter.bind("hi")


def build_not_an_app():
    return 42


def build_needs_args(x):
    return Greeter.bind(x)


class Plain:
    pass


not_an_app = 3
"""

FAILING_MODULE = """
import os
from shoal import serve


@serve.deployment(max_constructor_retry_count=1)
class Broken:
    def __init__(self):
        with open(os.path.join({where!r}, "pids"), "a") as f:
            f.write(f"{{os.getpid()}} {{os.getppid()}}\\n")
        raise RuntimeError("boom-in-constructor")


app = Broken.bind()
"""

DRIVER_SCRIPT = """
import json, sys, time
import psutil
from shoal import serve
from shoal.client import get_global_client
from myapp import app

handle = serve.run(app, name="drv")
assert handle.remote("there").result(timeout_s=30) == "hello there"
controller = get_global_client().controller_proc.pid
children = psutil.Process(controller).children(recursive=True)
replicas = [p.pid for p in children if "shoal.replica.server" in p.cmdline()]
proxies = [p.pid for p in children if "shoal.http.proxy" in p.cmdline()]
print(json.dumps({"controller": controller, "replicas": replicas, "proxies": proxies}), flush=True)
if sys.argv[1] == "shutdown":
    serve.shutdown()
    print("SHUTDOWN-DONE", flush=True)
else:
    time.sleep(3600)
"""


# --- helpers ----------------------------------------------------------------------------------
def _shoal_cmd(console_script: bool = True) -> list[str]:
    """The `shoal` console script of this venv, or `python -m shoal`."""
    script = os.path.join(os.path.dirname(sys.executable), "shoal")
    if console_script and os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "shoal"]


def _env() -> dict:
    env = dict(os.environ)
    # The child imports shoal from this checkout even if it is not installed (it is, editable).
    src = os.path.dirname(os.path.dirname(os.path.abspath(shoal.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [src, env.get("PYTHONPATH", "")] if p)
    return env


class _Proc:
    """A child process whose merged stdout/stderr is collected by a thread."""

    def __init__(self, cmd: list[str], cwd) -> None:
        self.popen = subprocess.Popen(cmd, cwd=str(cwd), env=_env(), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, fragment: str, timeout: float = STARTUP_TIMEOUT_S, regex: bool = False) -> str:
        """The first line containing `fragment` (or matching it as a regular expression when `regex`)."""
        deadline = time.monotonic() + timeout
        found = re.compile(fragment).search if regex else (lambda line: fragment in line)
        with self._cond:
            while True:
                for line in self.lines:
                    if found(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line containing {fragment!r} (exit code {self.popen.poll()}); "
                                         f"output so far:\n{chr(10).join(self.lines)}")
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not exit within {timeout}s; output:\n{self.output}") from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(5)


@pytest.fixture
def procs():
    """Started `_Proc`s and recorded psutil processes; whatever a failed test leaves is killed."""
    started: list[_Proc] = []
    recorded: list[psutil.Process] = []
    yield started, recorded
    for p in started:
        p.kill()
    for p in recorded:
        try:
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_all_gone(processes: Iterable[psutil.Process], timeout: float) -> None:
    processes = list(processes)
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in processes if _alive(p)]
        if not alive:
            return
        if time.monotonic() > deadline:
            desc = []
            for p in alive:
                try:
                    desc.append(f"{p.pid}: {' '.join(p.cmdline())}")
                except psutil.Error:
                    desc.append(str(p.pid))
            raise AssertionError(f"processes still alive after {timeout}s:\n" + "\n".join(desc))
        time.sleep(0.05)


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _is(p: psutil.Process, module: str) -> bool:
    try:
        return module in p.cmdline()
    except psutil.Error:
        return False


def _write(tmp_path, name: str, text: str) -> None:
    (tmp_path / name).write_text(textwrap.dedent(text))


# --- loading the application (in this process: no shoal processes) -------------------------------
@pytest.fixture
def app_dir(tmp_path, monkeypatch):
    """A directory holding a uniquely named copy of the app module; sys.path/modules restored after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"cliapp_{os.getpid()}_{time.monotonic_ns()}"
    _write(tmp_path, f"{name}.py", APP_MODULE)
    before = set(sys.modules)
    yield tmp_path, name
    for mod in set(sys.modules) - before:
        sys.modules.pop(mod, None)


@pytest.mark.parametrize("attr, ingress_args", [
    (":app", ()), (".app", ()), (":Greeter", ()), (":build", ("hi",)),
])
def test_load_application_forms(app_dir, attr, ingress_args):
    d, name = app_dir
    app = import_path.load_application(name + attr, str(d))
    assert isinstance(app, Application)
    assert app.deployment.name == "Greeter"
    assert app.deployment.init_args == ingress_args
    assert sys.path[0] == str(d)


def test_load_application_app_dir_default_is_cwd(app_dir, monkeypatch):
    d, name = app_dir
    monkeypatch.chdir(d)
    assert isinstance(import_path.load_application(f"{name}:app"), Application)


@pytest.mark.parametrize("attr, fragments", [
    (":nope", ["has no attribute 'nope'"]),
    (":not_an_app", ["is a int, not an application"]),
    (":Plain", ["is a class, not an application", "@serve.deployment"]),
    (":build_not_an_app", ["returned int, not an Application"]),
    (":build_needs_args", ["failed when called with no arguments", "TypeError"]),
])
def test_load_application_errors(app_dir, attr, fragments):
    d, name = app_dir
    with pytest.raises(import_path.ImportPathError) as info:
        import_path.load_application(name + attr, str(d))
    msg = str(info.value)
    assert f"'{name}{attr}'" in msg
    for fragment in fragments:
        assert fragment in msg


def test_load_application_module_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    uniq = f"{os.getpid()}_{time.monotonic_ns()}"
    _write(tmp_path, f"raises_{uniq}.py", "x = 1 / 0\n")
    _write(tmp_path, f"missingdep_{uniq}.py", f"import no_such_dependency_{uniq}\n")
    try:
        with pytest.raises(import_path.ImportPathError, match=f"module 'no_such_module_{uniq}' not found"):
            import_path.load_application(f"no_such_module_{uniq}:app", str(tmp_path))
        with pytest.raises(import_path.ImportPathError, match=r"ZeroDivisionError: division by zero \(at .*raises_"):
            import_path.load_application(f"raises_{uniq}:app", str(tmp_path))
        with pytest.raises(import_path.ImportPathError, match=f"importing module 'missingdep_{uniq}' failed: "
                                                      f"ModuleNotFoundError.*no_such_dependency_{uniq}"):
            import_path.load_application(f"missingdep_{uniq}:app", str(tmp_path))
        with pytest.raises(import_path.ImportPathError, match="expected 'module:attribute'"):
            import_path.load_application("justaname", str(tmp_path))
        with pytest.raises(import_path.ImportPathError, match="is not a directory"):
            import_path.load_application("m:app", str(tmp_path / "nowhere"))
    finally:
        for mod in [m for m in sys.modules if m.endswith(uniq)]:
            sys.modules.pop(mod, None)


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(cli.main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"shoal {shoal.__version__}"
    result = runner.invoke(cli.main, ["run", "--help"])
    assert result.exit_code == 0
    for option in ("--name", "--route-prefix", "--app-dir"):
        assert option in result.output


def test_python_dash_m_shoal(tmp_path):
    out = subprocess.run([sys.executable, "-m", "shoal", "--version"], cwd=str(tmp_path), env=_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"shoal {shoal.__version__}"


# --- `shoal run` end to end -----------------------------------------------------------------
@pytest.mark.parametrize("sig, console_script", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["SIGINT", "SIGTERM"])
def test_run_until_signal(tmp_path, procs, sig, console_script):
    started, recorded = procs
    _write(tmp_path, "myapp.py", APP_MODULE)
    cmd = _shoal_cmd(console_script) + ["run", "myapp:app", "--name", "myapp", "--route-prefix", "/greet"]
    cli_proc = _Proc(cmd, tmp_path)
    started.append(cli_proc)
    line = cli_proc.wait_for_line(RUNNING_LINE)
    assert line.startswith("Application 'myapp' is RUNNING")

    # The standby proxy is started once the serving one is healthy, so it may come just after RUNNING.
    def with_standby() -> list:
        tree = _tree(cli_proc.popen.pid)
        return tree if len([p for p in tree if _is(p, "shoal.http.proxy")]) == 2 else []

    tree = wait_for(with_standby, timeout=60, what="the proxy and its standby")
    recorded.extend(tree)
    controllers = [p for p in tree if _is(p, "shoal.controller")]
    replicas = [p for p in tree if _is(p, "shoal.replica.server")]
    assert len(controllers) == 1, [p.cmdline() for p in tree]
    assert len(replicas) == 1, [p.cmdline() for p in tree]
    assert replicas[0].ppid() == controllers[0].pid

    # The replica's constructor output reaches the CLI's output, prefixed with app/deployment names.
    constructed = cli_proc.wait_for_line(CONSTRUCTED)
    assert constructed.startswith(f"(myapp/Greeter replica="), constructed
    assert f"pid={replicas[0].pid})" in constructed

    cli_proc.popen.send_signal(sig)
    assert cli_proc.wait() == 0, cli_proc.output
    assert f"Got {sig.name}; shutting down." in cli_proc.output
    assert "Traceback" not in cli_proc.output
    _wait_all_gone(tree, timeout=EXIT_TIMEOUT_S)


@pytest.mark.parametrize("args, fragments", [
    (["run", "no_such_module_xyz:app"], ["'no_such_module_xyz:app'", "module 'no_such_module_xyz' not found"]),
    (["run", "myapp:nope"], ["'myapp:nope'", "has no attribute 'nope'"]),
    (["run", "myapp:not_an_app"], ["'myapp:not_an_app'", "not an application"]),
    (["run", "myapp", "--app-dir", "."], ["Invalid import path 'myapp'"]),
    (["run", "myapp:app", "--route-prefix", "greet"], ["Invalid value for '--route-prefix'", "must start with '/'"]),
], ids=["no-module", "no-attribute", "not-an-app", "no-attribute-part", "bad-route-prefix"])
def test_run_bad_arguments(tmp_path, args, fragments):
    _write(tmp_path, "myapp.py", APP_MODULE)
    cli_proc = _Proc(_shoal_cmd() + args, tmp_path)
    try:
        assert cli_proc.wait() == (2 if "--route-prefix" in args else 1)
    finally:
        cli_proc.kill()
    out = cli_proc.output
    for fragment in fragments:
        assert fragment in out, out
    assert "Traceback" not in out
    assert "controller" not in out  # failed before starting anything


def test_run_app_dir_option(tmp_path, procs):
    started, recorded = procs
    (tmp_path / "apps").mkdir()
    _write(tmp_path / "apps", "otherapp.py", APP_MODULE)
    cli_proc = _Proc(_shoal_cmd() + ["run", "otherapp.build", "--app-dir", "apps"], tmp_path)
    started.append(cli_proc)
    assert cli_proc.wait_for_line(RUNNING_LINE).startswith("Application 'default' is RUNNING")
    tree = _tree(cli_proc.popen.pid)
    recorded.extend(tree)
    cli_proc.popen.send_signal(signal.SIGINT)
    assert cli_proc.wait() == 0, cli_proc.output
    _wait_all_gone(tree, timeout=EXIT_TIMEOUT_S)


def test_run_constructor_fails(tmp_path, procs):
    started, recorded = procs
    _write(tmp_path, "badapp.py", FAILING_MODULE.format(where=str(tmp_path)))
    cli_proc = _Proc(_shoal_cmd() + ["run", "badapp:app"], tmp_path)
    started.append(cli_proc)
    assert cli_proc.wait() == 1, cli_proc.output
    out = cli_proc.output
    assert "Error: Application 'default' failed to deploy" in out, out
    assert "RuntimeError: boom-in-constructor" in out
    assert "is RUNNING" not in out
    # Every replica attempt recorded its pid and its controller's pid: all of them are gone.
    pids = {int(x) for x in (tmp_path / "pids").read_text().split()}
    assert pids
    for pid in pids:
        try:
            recorded.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _wait_all_gone(recorded, timeout=EXIT_TIMEOUT_S)


# --- a driver script: serve.shutdown() and SIGKILL ---------------------------------------------
def _start_driver(tmp_path, mode: str) -> tuple[_Proc, list[psutil.Process]]:
    _write(tmp_path, "myapp.py", APP_MODULE)
    _write(tmp_path, "driver.py", DRIVER_SCRIPT)
    driver = _Proc([sys.executable, "driver.py", mode], tmp_path)
    try:
        line = driver.wait_for_line('{"controller"')
    except BaseException:
        driver.kill()
        raise
    # Another process's output may precede it on the line, or follow it before its newline.
    pids, _ = json.JSONDecoder().raw_decode(line[line.index('{"controller"'):])
    assert len(pids["replicas"]) == 1 and len(pids["proxies"]) == 2, line  # the proxy and its standby
    processes = []
    for pid in [pids["controller"], *pids["replicas"], *pids["proxies"]]:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:  # already gone (serve.shutdown() is fast): fine
            assert mode == "shutdown"
    return driver, processes


def test_driver_shutdown_leaves_nothing(tmp_path, procs):
    started, recorded = procs
    driver, processes = _start_driver(tmp_path, "shutdown")
    started.append(driver)
    recorded.extend(processes)
    assert driver.wait() == 0, driver.output
    assert "SHUTDOWN-DONE" in driver.output
    _wait_all_gone(processes, timeout=EXIT_TIMEOUT_S)


def test_driver_sigkill_leaves_nothing(tmp_path, procs):
    started, recorded = procs
    driver, processes = _start_driver(tmp_path, "sleep")
    started.append(driver)
    recorded.extend(processes)
    assert all(_alive(p) for p in processes)
    driver.popen.send_signal(signal.SIGKILL)
    assert driver.wait() == -signal.SIGKILL
    _wait_all_gone(processes, timeout=EXIT_TIMEOUT_S)


SLOW_MODULE = """
import time
from shoal import serve


@serve.deployment
class Slow:
    def __init__(self):
        print("SLOW-CONSTRUCTING", flush=True)
        time.sleep(600)


app = Slow.bind()
"""


def test_run_interrupted_while_deploying(tmp_path, procs):
    """Ctrl-C while a constructor still runs stops everything at once, without waiting for it."""
    started, recorded = procs
    _write(tmp_path, "slowapp.py", SLOW_MODULE)
    cli_proc = _Proc(_shoal_cmd() + ["run", "slowapp:app"], tmp_path)
    started.append(cli_proc)
    cli_proc.wait_for_line("SLOW-CONSTRUCTING")
    tree = _tree(cli_proc.popen.pid)
    recorded.extend(tree)
    assert any(_is(p, "shoal.replica.server") for p in tree)
    cli_proc.popen.send_signal(signal.SIGINT)
    assert cli_proc.wait(timeout=60) == 0, cli_proc.output  # long before the 600 s constructor ends
    assert "Got SIGINT; shutting down." in cli_proc.output
    assert "is RUNNING" not in cli_proc.output
    assert "Traceback" not in cli_proc.output
    _wait_all_gone(tree, timeout=EXIT_TIMEOUT_S)


def test_run_outlives_a_controller_kill(tmp_path, procs):
    """`shoal run` owns its controller: one that dies is restarted, the app serves on, Ctrl-C stops all."""
    started, recorded = procs
    _write(tmp_path, "myapp.py", APP_MODULE)
    cli_proc = _Proc(_shoal_cmd() + ["run", "myapp:app"], tmp_path)
    started.append(cli_proc)
    cli_proc.wait_for_line(RUNNING_LINE)
    tree = _tree(cli_proc.popen.pid)
    recorded.extend(tree)
    controller = next(p for p in tree if _is(p, "shoal.controller"))
    replicas = [p for p in tree if _is(p, "shoal.replica.server")]
    everything = _sessions_processes(tree)
    recorded.extend(everything)
    controller.kill()
    cli_proc.wait_for_line("restarting it")
    new = wait_for(lambda: [p for p in _tree(cli_proc.popen.pid) if _is(p, "shoal.controller") and _alive(p)
                            and p.pid != controller.pid], what="a new controller")
    recorded.extend(new)
    assert cli_proc.popen.poll() is None
    assert replicas and all(_alive(p) for p in replicas)  # adopted, not restarted
    cli_proc.popen.send_signal(signal.SIGINT)
    assert cli_proc.wait() == 0, cli_proc.output
    _wait_all_gone(everything + new, timeout=EXIT_TIMEOUT_S)


def _sessions_processes(tree: list) -> list:
    """Every live process of the session(s) `tree` belongs to (adopted replicas are no controller's children)."""
    sessions = set()
    for p in tree:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if "--session-dir" in cmd:
            sessions.add(cmd[cmd.index("--session-dir") + 1])
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(s in cmd for s in sessions) and _alive(p):
            out.append(p)
    return out


def test_run_stops_when_the_controller_keeps_dying(tmp_path, procs):
    started, recorded = procs
    _write(tmp_path, "myapp.py", APP_MODULE)
    cli_proc = _Proc(_shoal_cmd() + ["run", "myapp:app"], tmp_path)
    started.append(cli_proc)
    cli_proc.wait_for_line(RUNNING_LINE)
    tree = _tree(cli_proc.popen.pid)
    everything = _sessions_processes(tree)
    recorded.extend(everything)
    deadline = time.monotonic() + 90
    while cli_proc.popen.poll() is None and time.monotonic() < deadline:
        for p in _tree(cli_proc.popen.pid):
            if _is(p, "shoal.controller") and _alive(p):
                p.kill()
        time.sleep(0.05)
    assert cli_proc.wait(timeout=20) == 1, cli_proc.output
    assert "died 5 times within a minute" in cli_proc.output
    assert "the shoal controller exited unexpectedly" in cli_proc.output
    _wait_all_gone(everything, timeout=30)