"""One deployment's replicas and the reconcile step that moves them toward the target.

Each tick: notice exits, place and launch pending replicas, roll outdated ones over in steps,
reconfigure in place where only light options changed, scale to the target count, and derive
the status (with the constructor's traceback when replicas cannot start).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from shoal.common import DeploymentID, DeploymentTargets, ReplicaID, RunningReplicaInfo
from shoal.config import ReplicaRank
from shoal.controller import downscale, status_notes
from shoal.controller.autoscaler import DeploymentAutoscaler
from shoal.controller.checkpoint import DeploymentSnapshot, ReplicaSnapshot
from shoal.controller.specs import DeploymentSpec
from shoal.runtime.base import ReplicaProcess, Reservation, ResourceRequest
from shoal.status import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from shoal.telemetry import serve_metrics
from shoal.transport.connection import ConnectionLost

if TYPE_CHECKING:
    from shoal.controller.controller import Controller
    from shoal.transport.connection import Connection

logger = logging.getLogger("shoal.controller")

MAX_PER_REPLICA_RETRY_COUNT = 3
# How long a replica adopted after a controller restart has to reconnect before it is replaced.
RECONNECT_GRACE_S = 15.0
MAX_BACKOFF_S = 64.0
HEALTH_CHECK_UNHEALTHY_THRESHOLD = 3


@dataclass
class ReplicaRecord:
    replica_id: ReplicaID
    code_version: str
    reconfigure_version: str
    state: ReplicaState = ReplicaState.STARTING
    placed: bool = False
    reservation: Optional[Reservation] = None
    process: Optional[ReplicaProcess] = None
    conn: Optional["Connection"] = None
    address: str = ""
    start_time: float = field(default_factory=time.time)
    stop_deadline: float = 0.0
    health_failures: int = 0
    last_health_check: float = field(default_factory=time.monotonic)
    health_inflight: bool = False
    model_ids: frozenset = frozenset()  # multiplexed models loaded or loading (the replica reports them)
    # Set for a replica adopted after a controller restart, until it reconnects: past it, it is replaced.
    reconnect_deadline: float = 0.0
    # Its rank among the deployment's replicas, given when it is placed and held until it is gone;
    # `rank_node` is the node its node_rank and local_rank count on.
    rank: Optional[ReplicaRank] = None
    rank_node: str = ""
    # (rank, world_size) the replica last heard; None: unknown (it is told again).
    told_rank: Optional[tuple] = None
    rank_inflight: bool = False

    @property
    def unique_id(self) -> str:
        return self.replica_id.unique_id


class DeploymentState:
    def __init__(self, controller: "Controller", deployment_id: DeploymentID, spec: DeploymentSpec):
        self.controller = controller
        self.id = deployment_id
        self.replicas: dict[str, ReplicaRecord] = {}
        self.deleting = False
        self.status = DeploymentStatus.UPDATING
        self.trigger = DeploymentStatusTrigger.CONFIG_UPDATE_STARTED
        self.message = ""
        self.start_failures = 0
        self.last_failure = ""
        self.backoff_until = 0.0
        self.backoff_exp = 0
        self.pending_reason = ""
        self._published: Optional[tuple] = None
        self._ranked_members: Optional[frozenset] = None  # the replicas whose ranks were last made dense
        self.autoscaler: Optional[DeploymentAutoscaler] = None
        self.set_spec(spec)

    # --- desired state ------------------------------------------------------------------------
    def set_spec(self, spec: DeploymentSpec) -> None:
        old = getattr(self, "spec", None)
        self.spec = spec
        self.code_version = spec.code_version()
        self.reconfigure_version = spec.reconfigure_version()
        self.request = ResourceRequest.from_config(spec.config, str(self.id))
        cfg = spec.config
        # What callers' routers need besides the replica set; it only changes here, with the spec.
        self._router_config_key = (cfg.max_ongoing_requests, cfg.max_queued_requests,
                                   cfg.request_router_config.model_dump_json(),
                                   cfg.backpressure_config.model_dump_json())
        if cfg.autoscaling_config is not None:
            a = cfg.autoscaling_config
            if self.autoscaler is None:
                self.autoscaler = DeploymentAutoscaler(self.id, a)
            else:
                self.autoscaler.configure(a)
            if old is None:
                self.target = a.initial_replicas if a.initial_replicas is not None else a.min_replicas
            else:
                self.target = max(a.min_replicas, min(a.max_replicas, self.target))
        else:
            self.autoscaler = None
            self.target = cfg.num_replicas or 1
        if old is None or old.code_version() != self.code_version or old.reconfigure_version() != self.reconfigure_version:
            self.start_failures = 0
            self.backoff_until = 0.0
            self.backoff_exp = 0
            self._set_status(DeploymentStatus.UPDATING, DeploymentStatusTrigger.CONFIG_UPDATE_STARTED, "")
        elif self.target != self._active_count():
            up = self.target > self._active_count()
            self._set_status(DeploymentStatus.UPSCALING if up else DeploymentStatus.DOWNSCALING,
                             DeploymentStatusTrigger.CONFIG_UPDATE_STARTED, "")
        self.controller.publish(self)

    def delete(self) -> None:
        self.deleting = True
        self.target = 0
        self._set_status(DeploymentStatus.UPDATING, DeploymentStatusTrigger.DELETING, "Deleting.")

    def _set_status(self, status: DeploymentStatus, trigger: DeploymentStatusTrigger, message: str) -> None:
        if (status, trigger, message) != (self.status, self.trigger, self.message):
            self.status, self.trigger, self.message = status, trigger, message
            self.controller.status_changed()

    # --- what routers see ---------------------------------------------------------------------
    def running_infos(self) -> list[RunningReplicaInfo]:
        return [
            RunningReplicaInfo(r.replica_id, r.address, self.spec.config.max_ongoing_requests,
                               r.reservation.node_id if r.reservation else "local", r.model_ids)
            for r in self.replicas.values()
            if r.state in (ReplicaState.RUNNING, ReplicaState.UPDATING)
        ]

    def targets(self) -> DeploymentTargets:
        cfg = self.spec.config
        rc = cfg.request_router_config
        return DeploymentTargets(self.id, self.running_infos(), cfg.max_queued_requests, exists=True,
                                 autoscaling=cfg.autoscaling_config is not None,
                                 backpressure_status_code=cfg.backpressure_config.status_code,
                                 backpressure_retry_after_s=cfg.backpressure_config.retry_after_s,
                                 request_router_class=rc.request_router_class,
                                 request_router_kwargs=tuple(sorted(rc.request_router_kwargs.items())),
                                 request_router_backoff=(rc.initial_backoff_s, rc.backoff_multiplier,
                                                         rc.max_backoff_s))

    def publish_if_changed(self) -> None:
        key = (tuple((r.replica_id.unique_id, r.multiplexed_model_ids) for r in self.running_infos()),
               self._router_config_key)
        if key != self._published:
            self._published = key
            self.controller.publish(self)

    # --- replica lifecycle --------------------------------------------------------------------
    def _active(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.state != ReplicaState.STOPPING]

    def _active_count(self) -> int:
        return len(self._active())

    def _new_replica(self) -> ReplicaRecord:
        uid = uuid.uuid4().hex[:8]
        rec = ReplicaRecord(ReplicaID(uid, self.id), self.code_version, self.reconfigure_version)
        self.replicas[uid] = rec
        self.controller.replicas_by_uid[uid] = rec
        return rec

    def _try_place(self, rec: ReplicaRecord) -> bool:
        runtime = self.controller.runtime
        res = runtime.reserve(self.request)
        if isinstance(res, str):
            self.pending_reason = (
                f"Deployment '{self.id.name}' in application '{self.id.app_name}' has replicas that cannot "
                f"be placed: each {res}. They stay pending until resources free up."
            )
            return False
        rec.reservation = res
        rec.placed = True
        rec.rank_node = res.node_id or "local"
        rec.rank = self._assign_rank(rec.rank_node)
        rec.address = runtime.replica_address(rec.replica_id)
        rec.start_time = time.time()
        try:
            logging_config = self.spec.config.logging_config
            rec.process = runtime.launch(rec.replica_id, res, logs_dir=logging_config.logs_dir if logging_config else None)
        except Exception as e:  # noqa: BLE001
            logger.exception("launching replica %s failed", rec.replica_id)
            self._on_start_failure(rec, f"The replica process could not be launched: {e!r}")
        return True

    def on_replica_node(self, rec: ReplicaRecord, node_id: str) -> None:
        """The replica runs on `node_id` (it says so when it connects). On a cluster the scheduler may
        have started it on another node than the runtime reserved, or on a node added for it: the
        runtime's accounting follows it, and so does its rank while it has not been told one yet."""
        res = rec.reservation
        if not node_id or res is None or (res.node_id == node_id and not res.waiting):
            return
        self.controller.runtime.placed(res, node_id)
        if rec.rank_node != node_id and rec.told_rank is None:
            rec.rank = None  # not its own holder while the node's ranks are counted
            rec.rank_node = node_id
            rec.rank = self._assign_rank(node_id)
        self.controller.wake()

    def on_replica_ready(self, rec: ReplicaRecord) -> None:
        if rec.state != ReplicaState.STARTING:
            return
        rec.state = ReplicaState.RUNNING
        rec.last_health_check = time.monotonic()
        serve_metrics.replica_started(self.id.name, rec.unique_id, self.id.app_name,
                                      (time.time() - rec.start_time) * 1000.0)
        self.start_failures = 0
        self.backoff_exp = 0
        self.controller.wake()

    def on_replica_failed(self, rec: ReplicaRecord, error: str) -> None:
        self._on_start_failure(rec, error)

    def _on_start_failure(self, rec: ReplicaRecord, error: str) -> None:
        if rec.state == ReplicaState.STOPPING:
            return
        self.start_failures += 1
        self.last_failure = error
        if getattr(self.controller.runtime, "echoes_replica_output", False):
            # Its traceback is in the replica's own output, echoed too: one line here says which.
            lines = error.strip().splitlines()
            log_file = getattr(rec.process, "log_file", None)
            logger.warning("replica %s of %s failed to start: %s (the traceback is in its output%s)", rec.unique_id,
                           self.id, lines[-1] if lines else "no error text", f", {log_file}" if log_file else "")
        else:
            logger.warning("replica %s of %s failed to start:\n%s", rec.unique_id, self.id, error.rstrip())
        self._stop(rec, graceful=False)
        threshold = self._failure_threshold()
        if self.start_failures < threshold:  # say why while retrying (deploy progress shows it)
            lines = error.strip().splitlines()
            self._set_status(self.status, DeploymentStatusTrigger.REPLICA_STARTUP_FAILED,
                             f"A replica failed to start ({self.start_failures} of {threshold} attempts); "
                             f"retrying. {lines[-1] if lines else ''}".rstrip())
        if self.start_failures >= threshold and not self._running(at_version=True):
            delay = min(2 ** self.backoff_exp, MAX_BACKOFF_S) + random.uniform(0, 1)
            self.backoff_exp += 1
            self.backoff_until = time.monotonic() + delay
        self.controller.wake()

    def _failure_threshold(self) -> int:
        return max(1, min(self.spec.config.max_constructor_retry_count, max(self.target, 1) * MAX_PER_REPLICA_RETRY_COUNT))

    def _running(self, at_version: bool = False) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.state in (ReplicaState.RUNNING, ReplicaState.UPDATING)
                and (not at_version or r.code_version == self.code_version)]

    def _stop(self, rec: ReplicaRecord, graceful: bool) -> None:
        if rec.state == ReplicaState.STOPPING:
            return
        was_serving = rec.state in (ReplicaState.RUNNING, ReplicaState.UPDATING)
        rec.state = ReplicaState.STOPPING
        cfg = self.spec.config
        rec.stop_deadline = time.monotonic() + (cfg.graceful_shutdown_timeout_s if graceful else 0.0)
        if not rec.placed:
            self._forget(rec)
            return
        if graceful and was_serving and rec.conn is not None:
            self.publish_if_changed()  # routers stop sending before the replica drains
            conn = rec.conn
            self.controller.spawn(conn.call("graceful_shutdown", cfg.graceful_shutdown_wait_loop_s))
        elif rec.process is not None:
            rec.process.kill()

    def _forget(self, rec: ReplicaRecord) -> None:
        self.replicas.pop(rec.unique_id, None)
        serve_metrics.replica_gone(self.id.name, rec.unique_id, self.id.app_name)
        self.controller.replicas_by_uid.pop(rec.unique_id, None)
        if rec.reservation is not None:
            self.controller.runtime.release(rec.reservation)
            rec.reservation = None

    # --- replica ranks (Ray Serve's ReplicaRank) -----------------------------------------------------
    # A replica gets its rank when it is placed (its node is known then): the lowest rank no replica of
    # the deployment holds, the node's node_rank (or the lowest free one for a new node) and the lowest
    # free local_rank on that node. It holds them until it is gone (also while it drains). Once the
    # deployment is steady (HEALTHY), ranks are made dense again: replicas whose rank is within 0..N-1
    # keep it, the others take the free ones in order; the same for node ranks and, per node, local
    # ranks. World size is the target count. Running replicas are told what changed (`update_rank`).
    def _assign_rank(self, node: str) -> ReplicaRank:
        holders = [r for r in self.replicas.values() if r.rank is not None]
        on_node = [r for r in holders if r.rank_node == node]
        node_rank = on_node[0].rank.node_rank if on_node else _lowest_free({r.rank.node_rank for r in holders})
        return ReplicaRank(rank=_lowest_free({r.rank.rank for r in holders}), node_rank=node_rank,
                           local_rank=_lowest_free({r.rank.local_rank for r in on_node}))

    def _compact_ranks(self) -> None:
        members = frozenset(self.replicas)
        if members == self._ranked_members:
            return
        self._ranked_members = members
        ranked = [r for r in self.replicas.values() if r.rank is not None]
        glob = _dense({r.unique_id: r.rank.rank for r in ranked})
        by_node: dict[str, list[ReplicaRecord]] = {}
        for r in ranked:
            by_node.setdefault(r.rank_node, []).append(r)
        nodes = _dense({n: rs[0].rank.node_rank for n, rs in by_node.items()})
        for node, recs in by_node.items():
            local = _dense({r.unique_id: r.rank.local_rank for r in recs})
            for r in recs:
                new = ReplicaRank(rank=glob[r.unique_id], node_rank=nodes[node], local_rank=local[r.unique_id])
                if new != r.rank:
                    logger.info("replica %s of %s moves from rank %d to rank %d (node rank %d, local rank %d)",
                                r.unique_id, self.id, r.rank.rank, new.rank, new.node_rank, new.local_rank)
                    r.rank = new

    def _tell_ranks(self) -> None:
        """Send each serving replica its rank and the world size when either changed."""
        if self.deleting:
            return
        for rec in self.replicas.values():
            if rec.state not in (ReplicaState.RUNNING, ReplicaState.UPDATING) or rec.conn is None \
                    or rec.rank_inflight or rec.rank is None:
                continue
            told = (rec.rank, self.target)
            if rec.told_rank != told:
                rec.rank_inflight = True
                self.controller.spawn(self._send_rank(rec, told))

    async def _send_rank(self, rec: ReplicaRecord, told: tuple) -> None:
        try:
            await rec.conn.call("update_rank", told[0], told[1])  # type: ignore[union-attr]
            rec.told_rank = told
        except ConnectionLost:
            pass  # the replica is gone: the reap step deals with it
        except Exception as e:  # noqa: BLE001 - the user's reconfigure raised
            if rec.state != ReplicaState.STOPPING:
                logger.warning("reconfigure of replica %s with rank %s failed: %s", rec.unique_id, told[0], e)
                self.last_failure = f"reconfigure failed: {e}"
                self._stop(rec, graceful=True)
        finally:
            rec.rank_inflight = False
            self.controller.wake()

    def hello_info(self, rec: ReplicaRecord) -> dict:
        """What a starting replica learns about its place: read before its constructor runs."""
        rec.told_rank = (rec.rank, self.target)
        return {"rank": rec.rank, "world_size": self.target}

    # --- checkpoint and recovery ---------------------------------------------------------------
    def snapshot(self) -> DeploymentSnapshot:
        describe = self.controller.runtime.describe
        replicas = [ReplicaSnapshot(r.replica_id, r.code_version, r.reconfigure_version, r.state.value, r.address,
                                    r.start_time, r.reservation, describe(r.process), r.model_ids,
                                    rank=r.rank, rank_node=r.rank_node)
                    for r in self.replicas.values() if r.placed and r.process is not None]
        return DeploymentSnapshot(self.id, self.spec, self.target, self.deleting, self.status.value,
                                  self.trigger.value, self.message, replicas)

    def checkpoint_key(self) -> tuple:
        return (id(self.spec), self.target, self.deleting,
                tuple((u, r.state, r.address, id(r.process), r.reconfigure_version, r.model_ids, r.rank)
                      for u, r in self.replicas.items()))

    def restore(self, snap: DeploymentSnapshot) -> None:
        """Take over what a previous controller ran: live replicas are adopted as they are."""
        self.target, self.deleting = snap.target, snap.deleting
        self.status, self.trigger = DeploymentStatus(snap.status), DeploymentStatusTrigger(snap.trigger)
        self.message = snap.message
        runtime = self.controller.runtime
        now = time.monotonic()
        for r in snap.replicas:
            process = runtime.adopt(r.process) if r.process else None
            if process is None:
                if r.state != ReplicaState.STOPPING.value:
                    logger.warning("replica %s of %s ended while the controller was down; replacing it",
                                   r.replica_id.unique_id, self.id)
                continue
            state = ReplicaState(r.state)
            # A reconfigure in flight died with the old controller: keep the old version, so it runs again.
            rec = ReplicaRecord(r.replica_id, r.code_version, r.reconfigure_version,
                                ReplicaState.RUNNING if state == ReplicaState.UPDATING else state,
                                placed=True, reservation=r.reservation, process=process, address=r.address,
                                start_time=r.start_time, model_ids=r.model_ids,
                                reconnect_deadline=now + RECONNECT_GRACE_S,
                                rank=r.rank, rank_node=r.rank_node or (r.reservation.node_id if r.reservation else "local"))
            if rec.state == ReplicaState.STOPPING:
                rec.stop_deadline = now + self.spec.config.graceful_shutdown_timeout_s
            if r.reservation is not None:
                runtime.adopt_reservation(r.reservation)
            self.replicas[rec.unique_id] = rec
            self.controller.replicas_by_uid[rec.unique_id] = rec
        for rec in self.replicas.values():
            if rec.rank is None:  # a checkpoint written before ranks were kept
                rec.rank = self._assign_rank(rec.rank_node)

    def on_replica_reconnected(self, rec: ReplicaRecord, ready: bool, model_ids: Optional[tuple]) -> None:
        rec.reconnect_deadline = 0.0
        rec.told_rank = None
        if model_ids is not None:
            rec.model_ids = frozenset(model_ids)
        if ready:
            self.on_replica_ready(rec)
        self.controller.wake()

    def on_replica_disconnected(self, rec: ReplicaRecord) -> None:
        """The replica's control connection closed: the process is exiting or dead."""
        self.controller.wake()

    # --- the reconcile step -------------------------------------------------------------------
    def reconcile(self) -> None:
        now = time.monotonic()
        self._reap(now)
        self._autoscale()
        self._roll_outdated()
        self._reconfigure_outdated()
        self._scale(now)
        self._place_pending()
        self._health_checks(now)
        self.publish_if_changed()
        self._update_status()
        self._tell_ranks()

    def _reap(self, now: float) -> None:
        for rec in list(self.replicas.values()):
            if rec.reconnect_deadline and now > rec.reconnect_deadline and rec.conn is None:
                rec.reconnect_deadline = 0.0
                if rec.state != ReplicaState.STOPPING:
                    logger.warning("replica %s of %s did not reconnect within %.0f s of the controller's restart; "
                                   "replacing it", rec.unique_id, self.id, RECONNECT_GRACE_S)
                    self._stop(rec, graceful=False)
            code = rec.process.exit_code() if rec.process is not None else None
            if rec.state == ReplicaState.STOPPING:
                if code is not None or not rec.placed:
                    self._forget(rec)
                elif now >= rec.stop_deadline:
                    rec.process.kill()  # type: ignore[union-attr]
                continue
            if code is None:
                continue
            if rec.state == ReplicaState.STARTING:
                out = rec.process.recent_output().strip()  # type: ignore[union-attr]
                self._on_start_failure(rec, f"The replica process exited with code {code} before it was ready."
                                       + (f" Its last output:\n{out}" if out else ""))
                self._forget(rec)
            else:
                logger.warning("replica %s of %s died (exit code %s); replacing it", rec.unique_id, self.id, code)
                rec.state = ReplicaState.STOPPING
                self._forget(rec)

    def _autoscale(self) -> None:
        if self.autoscaler is None or self.deleting:
            return
        queued, total = self.controller.load_reports.totals(self.id)
        self.autoscaler.observe(queued, total)
        if self.controller.app_autoscaled(self.id.app_name):
            return  # the application's policy decides (Controller._autoscale_apps)
        self.set_autoscale_target(self.autoscaler.decide(self.running_ids(), self.target))

    def running_ids(self) -> list[ReplicaID]:
        return [r.replica_id for r in self._running()]

    def set_autoscale_target(self, desired: int) -> None:
        if desired != self.target and not self.deleting:
            logger.info("autoscaling %s from %d to %d replicas (%.1f requests queued or running)",
                        self.id, self.target, desired, self.controller.load_reports.totals(self.id)[1])
            up = desired > self.target
            if self.autoscaler is not None:
                self.autoscaler.scaled(self.target, desired)
                self.controller.scaling_log.record(self.id, self.target, desired, self.autoscaler.explain(
                    self.controller.app_autoscaled(self.id.app_name)))
            self.target = desired
            if self.status in (DeploymentStatus.HEALTHY, DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING):
                self._set_status(DeploymentStatus.UPSCALING if up else DeploymentStatus.DOWNSCALING,
                                 DeploymentStatusTrigger.AUTOSCALING, "")

    def _roll_outdated(self) -> None:
        """Replace replicas of an older code version in steps of 20% of the target (at least one)."""
        if self.target == 0:
            return
        outdated = [r for r in self._active() if r.code_version != self.code_version]
        if not outdated:
            return
        new_running = len([r for r in self._running() if r.code_version == self.code_version])
        old_running = len([r for r in self._running() if r.code_version != self.code_version])
        pending = self.target - new_running - old_running
        rollout = max(int(0.2 * self.target), 1)
        max_to_stop = max(rollout - pending, 0)
        # Replicas that are not serving yet go first: stopping them costs nothing.
        outdated.sort(key=lambda r: r.state == ReplicaState.RUNNING)
        for rec in outdated[:max_to_stop]:
            logger.info("replacing replica %s of %s: code version %s, the deployment's is %s", rec.unique_id,
                        self.id, rec.code_version, self.code_version)
            self._stop(rec, graceful=rec.state == ReplicaState.RUNNING)

    def _reconfigure_outdated(self) -> None:
        for rec in self._running(at_version=True):
            if rec.reconfigure_version != self.reconfigure_version and rec.state == ReplicaState.RUNNING and rec.conn:
                rec.state = ReplicaState.UPDATING
                self.controller.spawn(self._reconfigure(rec, self.reconfigure_version))

    async def _reconfigure(self, rec: ReplicaRecord, version: str) -> None:
        try:
            await rec.conn.call("reconfigure", self.spec.config)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001
            logger.warning("reconfigure of replica %s failed: %s", rec.unique_id, e)
            self.last_failure = f"reconfigure failed: {e}"
            self._stop(rec, graceful=True)
            return
        if rec.state == ReplicaState.UPDATING:
            rec.state = ReplicaState.RUNNING
            rec.reconfigure_version = version
        self.controller.wake()

    def _scale(self, now: float) -> None:
        moving = self._move_off_draining_nodes()
        active = self._active()
        delta = self.target + len(moving) - len(active)  # a replacement for each replica that moves
        if delta > 0:
            if now < self.backoff_until:
                return
            for _ in range(delta):
                self._new_replica()
        elif delta < 0:
            for rec in self._to_stop(active, moving, -delta):
                self._stop(rec, graceful=True)

    def _to_stop(self, active: list[ReplicaRecord], moving: set[str], n: int) -> list[ReplicaRecord]:
        """The `n` replicas to stop first (`controller/downscale.py`, Ray Serve's order): those
        leaving a draining node, those not serving yet, outdated ones, then serving ones by node,
        the emptiest node first and the head node's last, so the cluster can remove a node."""
        runtime = self.controller.runtime
        serving_states = (ReplicaState.RUNNING, ReplicaState.UPDATING)
        load: dict[str, int] = {}  # node -> serving replicas of every deployment there
        for r in self.controller.replicas_by_uid.values():
            if r.state in serving_states and r.reservation is not None and r.reservation.node_id:
                load[r.reservation.node_id] = load.get(r.reservation.node_id, 0) + 1
        candidates = [downscale.StopCandidate(
            r.unique_id, node=r.reservation.node_id if r.reservation is not None else "",
            serving=r.state in serving_states, placed=r.placed, draining=r.unique_id in moving,
            outdated=r.code_version != self.code_version, started=r.start_time) for r in active]
        order = downscale.stop_order(candidates, load, runtime.head_node())
        return [self.replicas[uid] for uid in order[:n]]

    def _move_off_draining_nodes(self) -> set[str]:
        """The serving replicas on nodes the cluster drains (about to remove them): each gets a
        replacement elsewhere first (`_scale` counts them), and once as many replicas serve on other
        nodes as the target, they stop gracefully, so the node's removal loses no request. Replicas
        still starting there are stopped at once. Returns the ids of those still moving."""
        draining = self.controller.runtime.draining_nodes()
        if not draining or self.deleting:
            return set()
        moving = []
        for rec in self._active():
            if rec.reservation is None or rec.reservation.node_id not in draining:
                continue
            if rec.state == ReplicaState.STARTING:
                logger.info("replica %s of %s was starting on a draining node; starting it elsewhere",
                            rec.unique_id, self.id)
                self._stop(rec, graceful=False)
            else:
                moving.append(rec)
        moving_ids = {r.unique_id for r in moving}
        if moving and len([r for r in self._running() if r.unique_id not in moving_ids]) >= self.target:
            for rec in moving:
                logger.info("replica %s of %s: its node is draining and its replacement serves; stopping it",
                            rec.unique_id, self.id)
                self._stop(rec, graceful=True)
            return set()
        return moving_ids

    def _place_pending(self) -> None:
        self.pending_reason = ""
        for rec in list(self.replicas.values()):
            if rec.state == ReplicaState.STARTING and not rec.placed:
                if not self._try_place(rec):
                    break
        if not self.pending_reason:
            self.pending_reason = self._waiting_reason()

    def _waiting_reason(self) -> str:
        """Says which replicas wait for the cluster to add a node (launched, so its autoscaler sees
        them, but no node has room yet); "" when none does."""
        waiting = [r.reservation.waiting for r in self.replicas.values()
                   if r.state == ReplicaState.STARTING and r.reservation is not None and r.reservation.waiting]
        if not waiting:
            return ""
        n = len(waiting)
        return (f"Deployment '{self.id.name}' in application '{self.id.app_name}' has {n} "
                f"{'replica' if n == 1 else 'replicas'} waiting for the cluster to add a node with {waiting[0]}. "
                f"{'It starts' if n == 1 else 'They start'} there once the cluster's autoscaler adds one.")

    def _health_checks(self, now: float) -> None:
        cfg = self.spec.config
        for rec in self._running():
            if rec.health_inflight or rec.conn is None:
                continue
            if now - rec.last_health_check >= cfg.health_check_period_s * random.uniform(0.9, 1.1):
                rec.health_inflight = True
                rec.last_health_check = now
                self.controller.spawn(self._check_health(rec, cfg.health_check_timeout_s))

    async def _check_health(self, rec: ReplicaRecord, timeout: float) -> None:
        try:
            await rec.conn.call("check_health", timeout=timeout)  # type: ignore[union-attr]
            rec.health_failures = 0
        except Exception as e:  # noqa: BLE001
            rec.health_failures += 1
            logger.warning("health check of replica %s failed (%d/%d): %r", rec.unique_id, rec.health_failures,
                           HEALTH_CHECK_UNHEALTHY_THRESHOLD, e)
            if rec.health_failures >= HEALTH_CHECK_UNHEALTHY_THRESHOLD and rec.state != ReplicaState.STOPPING:
                self.last_failure = f"replica {rec.unique_id} failed {rec.health_failures} health checks: {e!r}"
                self._set_status(DeploymentStatus.UNHEALTHY, DeploymentStatusTrigger.HEALTH_CHECK_FAILED,
                                 self.last_failure)
                self._stop(rec, graceful=True)
        finally:
            rec.health_inflight = False
            self.controller.wake()

    def _update_status(self) -> None:
        running_new = self._running(at_version=True)
        if self.deleting:
            return
        if self.start_failures >= self._failure_threshold() and not running_new:
            status = DeploymentStatus.DEPLOY_FAILED if self.status in (
                DeploymentStatus.UPDATING, DeploymentStatus.DEPLOY_FAILED) else DeploymentStatus.UNHEALTHY
            self._set_status(status, DeploymentStatusTrigger.REPLICA_STARTUP_FAILED, (
                f"The deployment failed to start {self.start_failures} times in a row. This may be due to a "
                f"problem with its constructor or initial health check failing. See the replica logs for "
                f"details. Retrying after {max(0.0, self.backoff_until - time.monotonic()):.0f}s. "
                f"Error:\n{self.last_failure}"))
            return
        notes = status_notes.notes(self)  # slow starts, memory replacements (controller/status_notes.py)
        settled = all(r.state == ReplicaState.RUNNING and r.code_version == self.code_version
                      and r.reconfigure_version == self.reconfigure_version for r in self.replicas.values())
        if settled and len(self.replicas) == self.target:
            self._compact_ranks()
            if self.status != DeploymentStatus.HEALTHY and any(
                    r.told_rank != (r.rank, self.target) for r in self.replicas.values()):
                return  # steady once every replica knows its rank and the world size (`_tell_ranks`)
            if self.status in (DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING):
                trigger = (DeploymentStatusTrigger.UPSCALE_COMPLETED if self.status == DeploymentStatus.UPSCALING
                           else DeploymentStatusTrigger.DOWNSCALE_COMPLETED)
            elif self.status == DeploymentStatus.HEALTHY:
                trigger = self.trigger
            else:
                trigger = DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED
            self._set_status(DeploymentStatus.HEALTHY, trigger, notes)
            return
        if self.status == DeploymentStatus.HEALTHY:
            # A replica died or failed health checks: replacing it.
            self._set_status(DeploymentStatus.UPSCALING if self._active_count() < self.target
                             else DeploymentStatus.UPDATING, DeploymentStatusTrigger.UNSPECIFIED, "")
        if self.pending_reason and self.message != self.pending_reason:
            self._set_status(self.status, self.trigger, self.pending_reason)
        elif not self.pending_reason and self.message != notes and self.status != DeploymentStatus.UNHEALTHY \
                and self.trigger != DeploymentStatusTrigger.REPLICA_STARTUP_FAILED:
            self._set_status(self.status, self.trigger, notes)

    def replica_state_counts(self) -> dict[ReplicaState, int]:
        counts: dict[ReplicaState, int] = {}
        for r in self.replicas.values():
            counts[r.state] = counts.get(r.state, 0) + 1
        return counts

    def is_gone(self) -> bool:
        return self.deleting and not self.replicas


def _lowest_free(used: set) -> int:
    n = 0
    while n in used:
        n += 1
    return n


def _dense(current: dict) -> dict:
    """New ranks 0..len-1 for `current` (key -> rank), changing as few as possible: a key whose rank is
    in range keeps it (the first one, if two share it), the others take the free ranks in their order."""
    size = len(current)
    out: dict = {}
    kept: set = set()
    for key, rank in sorted(current.items(), key=lambda kv: kv[1]):
        if 0 <= rank < size and rank not in kept:
            out[key] = rank
            kept.add(rank)
    free = iter(sorted(set(range(size)) - kept))
    for key, _ in sorted(current.items(), key=lambda kv: kv[1]):
        if key not in out:
            out[key] = next(free)
    return out
