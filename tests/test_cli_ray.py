"""`shoal start/deploy/status/config/shutdown/run --runtime ray`, each a separate CLI process, against a
real three-node Ray cluster: the instance and its applications outlive every command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
import yaml

from conftest import wait_for
from ray_cluster import ray_cluster_fixture

pytestmark = pytest.mark.slow
ray_cluster = ray_cluster_fixture()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # examples/ lives here


def _env(**extra: str) -> dict:
    env = dict(os.environ)
    env.pop("SHOAL_RUNTIME", None)  # the fixture sets it; these commands choose by flag unless a test says
    return dict(env, **extra)


def shoal(address: str, *args: str, input: str | None = None, env: dict | None = None,
          ray_flags: bool = True) -> subprocess.CompletedProcess:
    flags = ["--runtime", "ray", "--address", address] if ray_flags else []
    return subprocess.run([sys.executable, "-m", "shoal", *args, *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, input=input, env=env or _env())


def ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, f"stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    return out.stdout


def _config(path, retrievers: int, **extra: dict) -> str:
    path.write_text(yaml.safe_dump({**extra, "applications": [{
        "name": "rag", "route_prefix": "/rag", "import_path": "examples.composition:app",
        "deployments": [{"name": "Retriever", "num_replicas": retrievers}]}]}))
    return str(path)


def _status(address: str) -> dict:
    return json.loads(ok(shoal(address, "status", "--output", "json")))


def _ask(url: str) -> httpx.Response:
    return httpx.get(f"{url}/rag", params={"query": "what do fish eat?"}, timeout=30)


def test_start_deploy_status_update_shutdown(ray_cluster, tmp_path):
    address = ray_cluster.cluster.address
    missing = shoal(address, "status")
    assert missing.returncode == 1 and "no shoal instance is running on the Ray cluster" in missing.stderr

    started = ok(shoal(address, "start"))
    assert "Started shoal on the Ray cluster" in started
    url = started.split("HTTP:", 1)[1].split()[0]
    assert url.startswith("http://")
    assert "already running" in ok(shoal(address, "start"))

    config = _config(tmp_path / "serve.yaml", retrievers=2)
    assert "Sent" in ok(shoal(address, "deploy", config, "--app-dir", ROOT, "--no-wait"))
    # While deploying (or already done): the app is there, chosen by SHOAL_RUNTIME alone this time.
    early = json.loads(ok(shoal(address, "status", "-o", "json", env=_env(SHOAL_RUNTIME="ray",
                                                                          SHOAL_RAY_ADDRESS=address),
                                ray_flags=False)))
    assert early["applications"]["rag"]["status"] in ("DEPLOYING", "RUNNING")
    waited = ok(shoal(address, "deploy", config, "--app-dir", ROOT))
    assert "All applications are RUNNING." in waited

    # Every command above has exited: the app is served by the detached instance alone.
    r = _ask(url)
    assert r.status_code == 200 and "Fish eat plankton" in r.text
    after = _status(address)
    assert after["applications"]["rag"]["status"] == "RUNNING"
    assert after["applications"]["rag"]["deployments"]["Retriever"]["replica_states"] == {"RUNNING": 2}
    assert len(after["proxies"]) == 3
    assert "rag" in ok(shoal(address, "status")) and "2 running" in ok(shoal(address, "status"))

    # Scale through the file: only the option changes. The running instance keeps its HTTP port.
    config = _config(tmp_path / "serve.yaml", retrievers=3, http_options={"port": 8123})
    scaling = shoal(address, "deploy", config, "--app-dir", ROOT)
    ok(scaling)
    assert "http_options: port differ from the running instance's" in scaling.stderr
    scaled = _status(address)["applications"]["rag"]["deployments"]
    assert scaled["Retriever"]["replica_states"] == {"RUNNING": 3}
    assert scaled["RAGPipeline"]["replica_states"] == {"RUNNING": 1}
    assert "Fish eat plankton" in _ask(url).text
    deployed = yaml.safe_load(ok(shoal(address, "config")))
    assert deployed["name"] == "rag" and deployed["deployments"] == [{"name": "Retriever", "num_replicas": 3}]

    refused = shoal(address, "shutdown", input="n\n")
    assert refused.returncode == 1 and _ask(url).status_code == 200
    assert "is shut down" in ok(shoal(address, "shutdown", "-y"))
    gone = shoal(address, "status")
    assert gone.returncode == 1 and "no shoal instance is running" in gone.stderr
    with pytest.raises(httpx.HTTPError):
        _ask(url)
    assert "No shoal instance is running" in ok(shoal(address, "shutdown", "-y"))


def test_a_config_that_fails_to_build_is_rejected_before_anything_starts(ray_cluster, tmp_path):
    address = ray_cluster.cluster.address
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"applications": [{"name": "rag", "import_path": "examples.composition:nope"}]}))
    out = shoal(address, "deploy", str(bad), "--app-dir", ROOT)
    assert out.returncode == 1
    assert f"{bad}: " in out.stderr and "has no attribute 'nope'" in out.stderr
    assert "no shoal instance is running" in shoal(address, "status").stderr  # nothing was started


def test_run_on_the_cluster_removes_what_it_started_on_ctrl_c(ray_cluster, tmp_path):
    address = ray_cluster.cluster.address
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "shoal", "run", "examples.composition:app", "--route-prefix",
                                 "/rag", "--runtime", "ray", "--address", address], cwd=ROOT, env=_env(),
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "is RUNNING" in log.read_text(), timeout=180, what="shoal run to deploy")
        assert _status(address)["applications"]["default"]["status"] == "RUNNING"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    # It started the instance, and nothing else is deployed there: both are gone.
    assert "no shoal instance is running" in shoal(address, "status").stderr
