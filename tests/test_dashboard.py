"""The dashboard of a detached instance (`shoal start`), over real processes, sockets and a real browser.

One instance serves the module: two applications (one autoscaling, one with two fixed replicas) and
some traffic. The login flow and the snapshot are checked over HTTP; the page itself in Debian's
`chromium`, headless, from the DOM it rendered (the raw HTML has no application in it: only the
page's script puts them there).

`SHOAL_DASHBOARD_SCREENSHOT=docs/dashboard.png` makes the browser test run a minute and a half of
traffic first and keep its screenshot there (how the README's picture is made).
"""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import threading
import time
from typing import Optional

import httpx
import pytest

from conftest import wait_for
from test_cli import _shoal_cmd
from test_cli_instance import CLI_TIMEOUT_S, Instance

pytestmark = pytest.mark.timeout(900)  # the first test may install chromium (apt-get)

APP_MODULE = """
import asyncio

from shoal import serve


@serve.deployment(max_ongoing_requests=4, autoscaling_config={
    "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 0,
    "downscale_delay_s": 600, "look_back_period_s": 2})
class Slow:
    async def __call__(self, request):
        print("dashboard-test: served a request", flush=True)
        await asyncio.sleep(0.2)
        if request.query_params.get("fail"):
            raise ValueError("asked to fail")
        return "slow"


@serve.deployment(num_replicas=2)
class Echo:
    def __call__(self, request):
        return "echo"


slow = Slow.bind()
echo = Echo.bind()
"""

CONFIG = """
applications:
- name: scaler
  route_prefix: /slow
  import_path: dashapp:slow
- name: echoes
  route_prefix: /echo
  import_path: dashapp:echo
"""


class Load:
    """Concurrent HTTP requests in threads until stopped."""

    def __init__(self, base: str, paths: list[str]) -> None:
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(base + p,), daemon=True) for p in paths]
        for t in self.threads:
            t.start()

    def _run(self, url: str) -> None:
        with httpx.Client(timeout=30, trust_env=False) as c:
            while not self.stop_event.is_set():
                try:
                    c.get(url)
                except httpx.HTTPError:
                    time.sleep(0.1)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    inst = Instance(tmp_path_factory.mktemp("dash"))
    inst.write("dashapp.py", APP_MODULE)
    inst.write("config.yaml", CONFIG)
    inst.cli("start")
    try:
        inst.cli("deploy", "config.yaml")
        base = inst.http_url()
        load = Load(base, ["/slow"] * 6 + ["/echo", "/echo", "/slow?fail=1"])
        try:
            # Traffic until the autoscaler has scaled `Slow` up and the charts have points with requests.
            wait_for(lambda: _decisions(inst), timeout=120, interval=0.5, what="an autoscaling decision")
            wait_for(lambda: _charted(inst, "scaler", "Slow") and _charted(inst, "echoes", "Echo"),
                     timeout=60, interval=0.5, what="chart points with requests for both deployments")
        finally:
            load.stop()
        yield inst
    finally:
        inst.cli("shutdown", "-y", check=None)


def _snapshot(inst: Instance, **params) -> dict:
    r = inst.admin("GET", "/dashboard/api/snapshot", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _deployment(snap: dict, app: str, dep: str) -> dict:
    [a] = [a for a in snap["applications"] if a["name"] == app]
    [d] = [d for d in a["deployments"] if d["name"] == dep]
    return d


def _decisions(inst: Instance) -> list:
    return [e for e in _snapshot(inst)["autoscaling_decisions"] if e["deployment"] == "Slow" and e["to"] > e["from"]]


def _charted(inst: Instance, app: str, dep: str) -> bool:
    return any(p["rps"] > 0 for p in _deployment(_snapshot(inst), app, dep)["series"])


def _login_url(inst: Instance) -> str:
    r = inst.admin("POST", "/api/dashboard/login-code")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["expires_in_s"] > 0 and body["code"] in body["login_url"]
    return body["login_url"]


def test_login_flow_and_what_a_session_opens(dash):
    admin = dash.info["admin_url"]
    get = lambda path, **kw: httpx.get(admin + path, timeout=30, trust_env=False, **kw)  # noqa: E731
    # Without a session: the page says how to get in; the data is refused.
    page = get("/dashboard")
    assert page.status_code == 401 and "shoal dashboard" in page.text
    assert get("/dashboard/api/snapshot").status_code == 401
    assert httpx.post(admin + "/api/dashboard/login-code", timeout=30).status_code == 401  # needs the token

    # A login link: once, and it sets the cookie.
    url = _login_url(dash)
    assert admin in url
    first = get(url[len(admin):])
    assert first.status_code == 303 and first.headers["location"] == "/dashboard"
    set_cookie = first.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/dashboard"):
        assert attribute in set_cookie, set_cookie
    cookie = set_cookie.split(";", 1)[0]
    again = get(url[len(admin):])
    assert again.status_code == 401 and "works once" in again.text
    assert get("/dashboard/login?code=made-up").status_code == 401

    # The cookie reads the dashboard...
    with_cookie = {"Cookie": cookie}
    page = get("/dashboard", headers=with_cookie)
    assert page.status_code == 200 and "dashboard.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert get("/dashboard/static/dashboard.js", headers=with_cookie).status_code == 200
    assert get("/dashboard/api/snapshot", headers=with_cookie).status_code == 200
    # ... and nothing else: not the admin routes, not a change, not under another host name.
    assert get("/api/serve/applications/", headers=with_cookie).status_code == 401
    assert httpx.delete(admin + "/api/serve/applications/", headers=with_cookie, timeout=30).status_code == 401
    assert httpx.post(admin + "/api/dashboard/login-code", headers=with_cookie, timeout=30).status_code == 401
    rebound = {**with_cookie, "Host": f"attacker.example:{admin.rsplit(':', 1)[1]}"}
    assert get("/dashboard/api/snapshot", headers=rebound).status_code == 401
    assert get("/dashboard/api/snapshot", headers={"Cookie": cookie[:-3] + "abc"}).status_code == 401
    assert dash.status()["applications"]["scaler"]["status"] == "RUNNING"  # still there


def test_snapshot_shows_apps_replicas_rates_logs_and_decisions(dash):
    snap = _snapshot(dash)
    assert [a["name"] for a in snap["applications"]] == ["echoes", "scaler"]
    assert snap["instance"]["http_url"] == dash.http_url()
    echo = _deployment(snap, "echoes", "Echo")
    assert echo["status"] == "HEALTHY" and echo["target_replicas"] == 2 and echo["autoscaling"] is None
    assert echo["replica_states"] == {"RUNNING": 2}
    pids = dash.replica_pids()
    for r in echo["replicas"]:
        assert r["state"] == "RUNNING" and r["pid"] in pids and r["node"] == "local"
        assert r["rss_bytes"] > 10 * 2**20 and r["age_s"] >= 0 and r["ongoing_requests"] is not None
    slow = _deployment(snap, "scaler", "Slow")
    assert slow["autoscaling"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1.0}
    busy = [p for p in slow["series"] if p["rps"] > 0]
    assert busy and all(p["p50_ms"] >= 100 for p in busy), busy  # each request sleeps 0.2 s
    assert any(p["error_rate"] > 0 for p in busy), busy  # one caller asks for failures
    logs = [line for r in slow["replicas"] for line in r["log_tail"]]
    # The user code's own lines: a request served, or the traceback of one that was asked to fail.
    assert any("dashboard-test: served a request" in line or "asked to fail" in line for line in logs), logs
    *_, decision = _decisions(dash)  # newest first: this is the first scale-up
    assert decision["application"] == "scaler" and decision["from"] == 1 and decision["to"] > 1
    assert "requests queued or running" in decision["reason"] and "target 1 per replica" in decision["reason"]
    # A poll that has seen everything up to T gets only newer points.
    newest = max(p["t"] for p in slow["series"])
    assert all(p["t"] > newest for p in _deployment(_snapshot(dash, since=newest), "scaler", "Slow")["series"])
    bad = dash.admin("GET", "/dashboard/api/snapshot", params={"since": "yesterday"})
    assert bad.status_code == 400 and "since" in bad.text


def _shoal_dashboard(inst: Instance, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in inst.env.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER")}
    return subprocess.run(_shoal_cmd() + ["dashboard", *args], cwd=str(inst.workdir), env={**environ, **env},
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def _logs_in(inst: Instance, url: str) -> bool:
    admin = inst.info["admin_url"]
    assert url.startswith(admin + "/dashboard/login?code="), url
    r = httpx.get(url, timeout=30, trust_env=False)
    return r.status_code == 303 and "HttpOnly" in r.headers.get("set-cookie", "")


def test_shoal_dashboard_command(dash, tmp_path):
    # --url: the link alone on stdout (for scripts), how long it works on stderr.
    printed = _shoal_dashboard(dash, "--url")
    assert printed.returncode == 0, printed.stderr
    assert "works once, within 5 minutes" in printed.stderr
    assert _logs_in(dash, printed.stdout.strip())
    # A browser ($BROWSER, as Python's webbrowser reads it) is handed a fresh link.
    opened = tmp_path / "opened"
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    browser.chmod(0o755)
    done = _shoal_dashboard(dash, BROWSER=str(browser))
    assert done.returncode == 0 and "Opened the dashboard" in done.stderr, done.stderr
    url = wait_for(lambda: opened.exists() and opened.read_text().strip(), what="the browser to be started")
    assert _logs_in(dash, url)
    # No display to start a browser on (an SSH session): the link is printed instead.
    headless = _shoal_dashboard(dash)
    assert headless.returncode == 0 and "No browser could be started" in headless.stderr
    assert _logs_in(dash, headless.stdout.strip())
    # No instance: a clear error.
    missing = _shoal_dashboard(dash, "--instance-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no shoal instance is running" in missing.stderr
    on_ray = _shoal_dashboard(dash, SHOAL_RUNTIME="ray")
    assert on_ray.returncode == 1 and "Ray's dashboard" in on_ray.stderr


# --- the page in a real browser --------------------------------------------------------------------------

_CHROMIUM: list = []  # (path or None, why not) once per test run


def chromium() -> str:
    """Debian's chromium, installed with apt-get if missing; the test is skipped, saying why, only
    when it cannot be installed."""
    if not _CHROMIUM:
        _CHROMIUM.append(_find_or_install_chromium())
    path, why = _CHROMIUM[0]
    if path is None:
        pytest.skip(why)
    return path


def _find_or_install_chromium() -> tuple[Optional[str], str]:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found, ""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return None, "chromium is not installed and cannot be here (`apt-get install -y chromium` needs root and apt)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = ""
    for cmd in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(cmd)}` took over 600 s"
        out = (done.stdout + done.stderr)[-600:]
        if shutil.which("chromium"):
            return shutil.which("chromium"), ""
    return None, f"chromium could not be installed with `apt-get install -y chromium`: {out}"


def _browse(url: str, profile: str, *extra: str) -> subprocess.CompletedProcess:
    """One headless run: the login link redirects to the page, which keeps the cookie for that run;
    virtual time lets the page poll a few times before the DOM is dumped."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--virtual-time-budget=8000", *extra, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


class _Dom(html.parser.HTMLParser):
    """Elements by tag with their attributes, and the text, of a dumped DOM."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def having(self, attr: str) -> list[dict]:
        return [a for _, a in self.elements if attr in a]


@pytest.mark.slow
def test_page_renders_in_a_headless_browser(dash, tmp_path):
    shot = os.environ.get("SHOAL_DASHBOARD_SCREENSHOT")
    if shot:  # a picture worth keeping: a minute and a half of uneven traffic first
        load = Load(dash.http_url(), ["/slow"] * 3 + ["/echo"] * 3 + ["/slow?fail=1"])
        time.sleep(45)
        load.stop()
        load = Load(dash.http_url(), ["/slow"] * 8 + ["/echo"])
        time.sleep(45)
        load.stop()
    raw = httpx.get(dash.info["admin_url"] + "/dashboard", headers={"Authorization": f"Bearer {dash.token}"},
                    timeout=30).text
    assert "scaler" not in raw  # what the browser shows below comes from the page's script

    done = _browse(_login_url(dash), str(tmp_path / "profile"), "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = _Dom(done.stdout)
    text = " ".join(dom.text)
    assert {a["data-app"] for a in dom.having("data-app")} == {"scaler", "echoes"}, text[:2000]
    assert {a["data-deployment"] for a in dom.having("data-deployment")} == {"Slow", "Echo"}
    counts = {(a["data-running"], a["data-target"]) for a in dom.having("data-running")}
    assert ("2", "2") in counts, counts  # Echo's two replicas
    assert "2/2" in text and "replicas running" in text
    assert len(dom.having("data-replica")) >= 3  # Slow's (scaled up) and Echo's, one row each
    points = [int(a["data-points"]) for a in dom.having("data-points")]
    assert points and max(points) > 0, points  # charts drawn with data
    assert any(tag == "path" and "line" in a.get("class", "") for tag, a in dom.elements), "no chart line"
    assert "live" in text and "logged out" not in text

    png = str(tmp_path / "dashboard.png")
    done = _browse(_login_url(dash), str(tmp_path / "profile2"), "--window-size=1400,1000", f"--screenshot={png}")
    assert done.returncode == 0 and os.path.getsize(png) > 10_000, done.stderr[-2000:]
    if shot:
        shutil.copyfile(png, shot)


@pytest.mark.slow
def test_page_without_a_session_says_how_to_get_in(dash, tmp_path):
    """A browser without a session (never logged in, or one this instance no longer accepts) is
    told to run `shoal dashboard`."""
    admin = dash.info["admin_url"]
    done = _browse(admin + "/dashboard", str(tmp_path / "profile"), "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"Not logged in.*shoal dashboard", " ".join(_Dom(done.stdout).text), re.S)
