"""The status table and deploy progress lines the CLI prints (plain data in, text out)."""

from __future__ import annotations

from shoal.cli.output import DeployProgress, replica_summary, status_table
from shoal.status import (ApplicationStatus, ApplicationStatusOverview, DeploymentStatus, DeploymentStatusOverview,
                          DeploymentStatusTrigger, ProxyStatus, ReplicaState, ServeStatus)


def _status(app_status: str, dep_status: str, states: dict, message: str = "", app_message: str = "") -> dict:
    return ServeStatus(
        proxies={"local:0": ProxyStatus.HEALTHY},
        applications={"app": ApplicationStatusOverview(
            ApplicationStatus(app_status), app_message, 1.0,
            {"Model": DeploymentStatusOverview(DeploymentStatus(dep_status), DeploymentStatusTrigger.UNSPECIFIED,
                                               {ReplicaState(k): v for k, v in states.items()}, message)})},
    ).to_dict()


def test_replica_summary_orders_states():
    assert replica_summary({"STARTING": 1, "RUNNING": 2}) == "2 running, 1 starting"
    assert replica_summary({}) == "no replicas"


def test_status_table():
    table = status_table(_status("DEPLOYING", "UPDATING", {"STARTING": 2}, message="waiting for 4 CPUs\nmore"))
    lines = table.splitlines()
    assert lines[0] == "Proxies: 1 HEALTHY"
    assert lines[2].split() == ["APPLICATION", "/", "DEPLOYMENT", "STATUS", "REPLICAS", "MESSAGE"]
    assert lines[3].split() == ["app", "DEPLOYING"]
    assert lines[4].split() == ["Model", "UPDATING", "2", "starting", "waiting", "for", "4", "CPUs"]
    assert status_table(ServeStatus().to_dict()).endswith("No applications.")


def test_progress_prints_changes_once_and_the_failure_reason():
    out: list[str] = []
    progress = DeployProgress(out.append, ["app"])
    starting = _status("DEPLOYING", "UPDATING", {"STARTING": 1})
    progress.update(starting)
    progress.update(starting)
    assert out == ["app/Model: UPDATING, 1 starting", "app: DEPLOYING"]
    assert progress.outcome(starting) is None
    failed = _status("DEPLOY_FAILED", "DEPLOY_FAILED", {}, message="boom",
                     app_message="Deployment 'Model' failed to deploy: Traceback\nRuntimeError: boom")
    progress.update(failed)
    assert out[2] == "app/Model: DEPLOY_FAILED, no replicas"
    assert out[3] == "app: DEPLOY_FAILED:\n  Deployment 'Model' failed to deploy: Traceback\n  RuntimeError: boom"
    assert progress.outcome(failed) is False


def test_outcome_waits_for_healthy_deployments_and_every_app():
    progress = DeployProgress(lambda line: None, ["app"])
    assert progress.outcome(_status("RUNNING", "UPSCALING", {"RUNNING": 1, "STARTING": 1})) is None
    assert progress.outcome(_status("RUNNING", "HEALTHY", {"RUNNING": 2})) is True
    assert DeployProgress(lambda line: None, ["app", "other"]).outcome(
        _status("RUNNING", "HEALTHY", {"RUNNING": 2})) is None
