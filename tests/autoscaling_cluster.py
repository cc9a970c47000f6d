"""An autoscaling Ray cluster on this machine, for the Ray runtime's elastic tests.

Ray's own tool, `ray.cluster_utils.AutoscalingCluster`: a head node started by `ray start --head`
with Ray's autoscaler, whose fake node provider starts worker nodes as local processes when Ray
reports demand nobody can place, and removes them when idle. Two things of it are changed here:

- its base config: Ray's wheel lacks `autoscaler/_private/fake_multi_node/example.yaml`, so the
  config is written whole here (the fields the autoscaler reads, nothing more);
- starting and stopping: `AutoscalingCluster.start` and `.shutdown` run `ray stop --force`, which
  kills every Ray process of this user on the machine (other test runs' clusters too). Instead the
  cluster runs under a small keeper process that is a child subreaper: every Ray process the head
  and the autoscaler start stays its descendant, and it kills exactly those when told to, or when
  the test process dies (its stdin closes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from typing import Any, Optional

import pytest

# The keeper: becomes a child subreaper, runs `ray start`, says "ready", waits for stdin to close,
# then ends every descendant (SIGTERM, then SIGKILL) and reaps them.
_KEEPER = textwrap.dedent("""
    import ctypes, os, signal, subprocess, sys, time

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def descendants():
        children = {}
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
        out, todo = [], [os.getpid()]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out

    def end_all():
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            for pid in descendants():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    while os.waitpid(-1, os.WNOHANG)[0]:
                        pass
                except ChildProcessError:
                    break
                if not descendants():
                    break
                time.sleep(0.1)

    rc = subprocess.call(sys.argv[1:], stdout=sys.stderr, start_new_session=True)  # stdout says only "ready"
    print("ready" if rc == 0 else f"failed {rc}", flush=True)
    try:
        sys.stdin.read()
    finally:
        end_all()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_config(gcs_address: str) -> dict:
    """What Ray's missing example.yaml held: the fake provider, no node updaters, quick idle removal."""
    return {
        "cluster_name": "shoal-fake-multinode",
        "max_workers": 8,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _autoscaling_cluster_class() -> Any:
    from ray.cluster_utils import AutoscalingCluster

    class KeptAutoscalingCluster(AutoscalingCluster):
        """`AutoscalingCluster` with its config written here and its processes kept to itself."""

        def __init__(self, head_resources: dict, worker_node_types: dict, **config_kwargs: Any):
            self.port = _free_port()
            self.temp_dir = tempfile.mkdtemp(prefix="shoal-ray-as-", dir="/tmp")
            self._keeper: Optional[subprocess.Popen] = None
            super().__init__(head_resources, worker_node_types, **config_kwargs)

        @property
        def address(self) -> str:
            from ray._private.services import get_node_ip_address

            return f"{get_node_ip_address()}:{self.port}"

        def _generate_config(self, head_resources: dict, worker_node_types: dict, autoscaler_v2: bool = False,
                             **config_kwargs: Any) -> dict:
            config = _base_config(self.address)
            config["available_node_types"] = dict(worker_node_types)
            config["available_node_types"]["ray.head.default"] = {
                "resources": dict(head_resources), "node_config": {}, "max_workers": 0}
            config.update(config_kwargs)
            return config

        def start(self, _system_config: Optional[dict] = None, override_env: Optional[dict] = None) -> None:
            config_file = os.path.join(self.temp_dir, "autoscaling.json")
            with open(config_file, "w") as f:
                json.dump(self._config, f)
            head = dict(self._head_resources)
            cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head",
                   f"--port={self.port}", f"--temp-dir={self.temp_dir}", f"--autoscaling-config={config_file}",
                   f"--num-cpus={head.pop('CPU', 0)}", "--include-dashboard=false", "--disable-usage-stats",
                   "--dashboard-agent-listen-port=0"]  # not Ray's fixed default: another cluster may hold it
            if head:
                cmd.append(f"--resources={json.dumps(head)}")
            # Token authentication off: a token in ~/.ray would switch it on for `ray start`'s cluster only.
            env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1", RAY_TMPDIR=self.temp_dir,
                       RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", **(override_env or {}))
            env.pop("RAY_ADDRESS", None)
            self._keeper = subprocess.Popen([sys.executable, "-c", _KEEPER, *cmd], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, env=env, text=True,
                                            start_new_session=True)
            line = self._keeper.stdout.readline().strip()  # type: ignore[union-attr]
            if line != "ready":
                self.shutdown()
                raise RuntimeError(f"ray start failed: {line or 'no answer'}")

        def shutdown(self) -> None:
            keeper, self._keeper = self._keeper, None
            if keeper is not None:
                keeper.stdin.close()  # type: ignore[union-attr]
                try:
                    keeper.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    keeper.kill()
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    return KeptAutoscalingCluster


def autoscaling_cluster_fixture(head_resources: dict, worker_node_types: dict):
    """A module fixture: the cluster, started, with this process connected (ray.init) and
    SHOAL_RUNTIME=ray while it lives; shoal shut down and every process of the cluster ended after."""

    @pytest.fixture(scope="module")
    def autoscaling_cluster():
        ray = pytest.importorskip("ray")
        from shoal import serve

        cluster = _autoscaling_cluster_class()(dict(head_resources), worker_node_types)
        saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "SHOAL_RUNTIME")}
        os.environ["RAY_TMPDIR"] = cluster.temp_dir  # a plain ray.init() elsewhere must not find it
        try:
            cluster.start()
            ray.init(address=cluster.address, logging_level="WARNING")
            os.environ["SHOAL_RUNTIME"] = "ray"
            yield cluster
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    return autoscaling_cluster
