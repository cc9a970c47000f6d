"""The dashboard's pieces without processes: chart history from metric snapshots, login codes, sessions."""

from __future__ import annotations

import time

from shoal.dashboard.auth import DashboardAuth, readable_with_cookie
from shoal.telemetry.history import LLM_TOKENS, LLM_TTFT, LLM_WAITING, MetricsHistory, quantile
from shoal.telemetry.registry import COUNTER, GAUGE, HISTOGRAM
from shoal.telemetry.serve_metrics import REPLICA_ERRORS, REPLICA_LATENCY, REPLICA_REQUESTS

LABELS = ("deployment", "replica", "application", "route")
BOUNDS = (10.0, 100.0, 1000.0)


def _snap(replicas: dict, llm: dict | None = None) -> dict:
    """replicas: uid -> (ok, errors, latency bucket counts); one deployment `app/D`."""
    ok, err, lat = {}, {}, {}
    for uid, (n_ok, n_err, buckets) in replicas.items():
        key = ("D", uid, "app", "/")
        ok[key], err[key], lat[key] = float(n_ok), float(n_err), list(buckets) + [0.0]
    snap = {REPLICA_REQUESTS: (COUNTER, "", LABELS, None, ok), REPLICA_ERRORS: (COUNTER, "", LABELS, None, err),
            REPLICA_LATENCY: (HISTOGRAM, "", LABELS, BOUNDS, lat)}
    if llm:
        lab = ("model_name", "engine")
        snap[LLM_TOKENS] = (COUNTER, "", lab, None, {("m", e): v[0] for e, v in llm.items()})
        snap[LLM_WAITING] = (GAUGE, "", lab, None, {("m", e): v[1] for e, v in llm.items()})
        snap[LLM_TTFT] = (HISTOGRAM, "", lab, (0.1, 1.0), {("m", e): list(v[2]) + [0.0] for e, v in llm.items()})
    return snap


def test_quantile_interpolates_within_buckets():
    assert quantile(0.5, BOUNDS, [0, 10, 0, 0]) == 55.0  # halfway through (10, 100]
    assert quantile(0.99, BOUNDS, [99, 0, 0, 1]) == 10.0
    assert quantile(0.999, BOUNDS, [0, 0, 0, 5]) == 1000.0  # +Inf: the highest finite bound
    assert quantile(0.5, BOUNDS, [0, 0, 0, 0]) is None


def test_history_turns_counter_differences_into_rates():
    h = MetricsHistory(points=10, interval_s=2.0)
    t = 1000.0
    h.sample(_snap({"r1": (100, 0, [100, 0, 0, 0])}), now=t)  # a baseline: nothing charted yet
    assert h.series(("app", "D")) == []
    h.sample(_snap({"r1": (118, 2, [100, 20, 0, 0])}), now=t + 10)
    h.sample(_snap({"r1": (138, 2, [110, 30, 0, 0])}), now=t + 12)
    p = h.series(("app", "D"))[-1]
    assert p["rps"] == 10.0 and p["error_rate"] == 0.0
    assert p["p50_ms"] == 10.0 and 10.0 < p["p99_ms"] <= 100.0  # 10 requests <= 10 ms, 10 in (10, 100]
    # A new replica's series counts from zero; errors are part of the rate.
    h.sample(_snap({"r1": (138, 2, [110, 30, 0, 0]), "r2": (6, 2, [0, 0, 8, 0])}), now=t + 14)
    p = h.series(("app", "D"))[-1]
    assert p["rps"] == 4.0 and p["error_rate"] == 0.25 and p["p50_ms"] > 100.0
    # A series that vanishes (an ended replica's, expired) makes no negative rate.
    h.sample(_snap({"r2": (6, 2, [0, 0, 8, 0])}), now=t + 16)
    p = h.series(("app", "D"))[-1]
    assert p["rps"] == 0.0 and p["p50_ms"] is None
    # Only newer points on request; a deleted deployment's points go.
    assert [q["t"] for q in h.series(("app", "D"), since=t + 14)] == [t + 16]
    h.forget(set())
    assert h.series(("app", "D")) == []


def test_history_keeps_a_bounded_window():
    h = MetricsHistory(points=3, interval_s=2.0)
    for i in range(10):
        h.sample(_snap({"r1": (i * 10, 0, [i * 10, 0, 0, 0])}), now=1000.0 + 10 * i)
    assert len(h.series(("app", "D"))) == 3


def test_history_attributes_llm_metrics_by_engine():
    owners = {"r1": ("app", "D")}
    h = MetricsHistory(engine_owner=owners.get, points=10)
    h.sample(_snap({"r1": (0, 0, [0, 0, 0, 0])}, llm={"r1": (0.0, 0.0, [0, 0, 0])}), now=1000.0)
    h.sample(_snap({"r1": (4, 0, [4, 0, 0, 0])}, llm={"r1": (400.0, 3.0, [4, 0, 0])}), now=1010.0)
    owners.clear()  # the replica ended: its engine is still known from before
    h.sample(_snap({"r1": (8, 0, [8, 0, 0, 0])}, llm={"r1": (600.0, 1.0, [4, 4, 0])}), now=1012.0)
    p = h.series(("app", "D"))[-1]
    assert p["tokens_per_s"] == 100.0 and p["queue"] == 1.0
    assert 100.0 < p["ttft_p50_ms"] <= 1000.0
    assert h.llm_queues() == {"r1": (0.0, 1.0)}


def test_login_codes_work_once_and_sessions_are_signed():
    auth = DashboardAuth("secret-token", 1234)
    code = auth.new_code()
    session = auth.redeem(code)
    assert session is not None and auth.valid(session)
    assert auth.redeem(code) is None, "a login code works once"
    assert auth.redeem("made-up") is None
    expiry, _, mac = session.partition(".")
    assert not auth.valid(f"{int(expiry) + 1}.{mac}"), "a session's expiry cannot be extended"
    assert not auth.valid(f"{int(time.time()) - 1}.{mac}")
    assert not DashboardAuth("another-token", 1234).valid(session), "a new instance token ends sessions"
    cookie = auth.set_cookie(session)
    assert cookie.startswith("shoal_dashboard_1234=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/dashboard" in cookie
    assert auth.session_of(f"other=1; shoal_dashboard_1234={session}") == session
    assert auth.session_of("shoal_dashboard_999=x") is None


def test_session_cookie_opens_dashboard_reads_only():
    assert readable_with_cookie("GET", "/dashboard")
    assert readable_with_cookie("GET", "/dashboard/api/snapshot")
    assert not readable_with_cookie("POST", "/dashboard/api/snapshot")
    assert not readable_with_cookie("GET", "/api/serve/applications/")
    assert not readable_with_cookie("GET", "/dashboardx")
