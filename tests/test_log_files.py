"""Log files of a running instance (docs/observability.md, "Logs"): the proxy's JSON lines, rotation
at a small size with the configured count while lines keep flowing, and `logs_dir` per deployment
and per application.

One instance for the module, started with `serve.start(logging_config={"encoding": "JSON"})` (the
proxy's and the controller's encoding) and a 6000-byte rotation limit with 2 backups. Files are
polled with generous bounds; nothing is timed.
"""

from __future__ import annotations

import glob
import itertools
import json
import os

import httpx
import pytest

from conftest import wait_for
from shoal import serve
from shoal.api import get_http_url
from shoal.client import get_global_client

pytestmark = pytest.mark.timeout(240)
MAX_BYTES, BACKUPS = 6000, 2
_ids = itertools.count()


@serve.deployment
class Hello:
    def __call__(self, request) -> str:
        return "hello"


@serve.deployment
class Down:
    def hello(self) -> str:
        return "down"


@serve.deployment
class Front:
    def __init__(self, down) -> None:
        self.down = down

    async def __call__(self, request) -> str:
        return await self.down.hello.remote()


@pytest.fixture(scope="module", autouse=True)
def instance():
    with pytest.MonkeyPatch.context() as mp:  # the instance's processes inherit them
        mp.setenv("SHOAL_LOG_ROTATION_MAX_BYTES", str(MAX_BYTES))
        mp.setenv("SHOAL_LOG_ROTATION_BACKUP_COUNT", str(BACKUPS))
        try:
            serve.start(http_options={"port": 0}, logging_config={"encoding": "JSON"})
            yield
        finally:
            serve.shutdown()


def _logs() -> str:
    return get_global_client().session_dir + "/logs"


def _lines(pattern: str) -> list[str]:
    """The lines of the files matching `pattern`, their rotated backups included."""
    out: list[str] = []
    for path in glob.glob(pattern) + glob.glob(pattern + ".*"):
        with open(path, errors="replace") as f:
            out += f.read().splitlines()
    return out


def _get(route: str, rid: str = "") -> None:
    r = httpx.get(f"{get_http_url()}{route}", headers={"x-request-id": rid or f"rid{next(_ids)}"}, timeout=30)
    assert r.status_code == 200


def test_proxy_access_lines_in_json():
    serve.run(Hello.bind(), name="jproxy", route_prefix="/jproxy")
    _get("/jproxy", "rid-json-1")

    def find():
        for ln in _lines(os.path.join(_logs(), "proxy_*.log")):
            if ln.startswith("{") and '"rid-json-1"' in ln:
                return json.loads(ln)
        return None

    rec = wait_for(find, timeout=30, what="the proxy's JSON access line")
    assert rec["name"] == "shoal.access" and rec["levelname"] == "INFO" and rec["asctime"]
    assert rec["message"].startswith("GET /jproxy 200 ") and rec["message"].endswith("ms")
    assert rec["route"] == "/jproxy" and rec["application"] == "jproxy" and rec["deployment"] == "Hello"
    assert rec["component"] == "proxy_0"
    serve.delete("jproxy")


def test_logs_rotate_at_size_keep_count_and_keep_flowing():
    serve.run(Hello.bind(), name="rot", route_prefix="/rot")
    replica = os.path.join(_logs(), "replica_rot_Hello_*.log")
    proxy = os.path.join(_logs(), "proxy_0.log")

    def rotated_twice() -> bool:
        for _ in range(20):
            _get("/rot")
        return bool(glob.glob(replica + ".2")) and os.path.exists(proxy + ".2")

    wait_for(rotated_twice, timeout=120, what="the replica's and the proxy's logs rotated twice")
    for pattern in (replica, proxy):
        assert not glob.glob(pattern + f".{BACKUPS + 1}"), f"more than {BACKUPS} backups of {pattern}"
        for path in glob.glob(pattern + ".*"):
            assert os.path.getsize(path) >= MAX_BYTES, path  # rotated on reaching the size, not before
    # Lines keep flowing into the new files: a request after the rotations gets its lines.
    _get("/rot", "rid-after-rotation")
    wait_for(lambda: any(" rid-after-rotation -- GET /rot 200 " in ln for ln in _lines(replica)),
             timeout=30, what="the replica's access line after rotation")
    wait_for(lambda: any('"rid-after-rotation"' in ln for ln in _lines(proxy)),
             timeout=30, what="the proxy's access line after rotation")
    serve.delete("rot")


def test_logs_dir_of_deployment_and_application(tmp_path):
    app_dir, down_dir = tmp_path / "app_logs", tmp_path / "down_logs"
    down = Down.options(logging_config={"logs_dir": str(down_dir)}).bind()
    serve.run(Front.bind(down), name="ldir", route_prefix="/ldir", logging_config={"logs_dir": str(app_dir)})
    _get("/ldir", "rid-logs-dir")
    wait_for(lambda: any(" rid-logs-dir -- GET /ldir 200 " in ln
                         for ln in _lines(str(app_dir / "replica_ldir_Front_*.log"))),
             timeout=30, what="Front's access line in the application's logs_dir")
    wait_for(lambda: any(" rid-logs-dir -- CALL hello OK " in ln
                         for ln in _lines(str(down_dir / "replica_ldir_Down_*.log"))),
             timeout=30, what="Down's access line in its own logs_dir")
    assert not glob.glob(os.path.join(_logs(), "replica_ldir_*"))
    serve.delete("ldir")
