"""The per-caller router of one deployment: queue, choose a replica, send, account, retry.

One `Router` exists per (deployment, event loop) in a process. It keeps its own count of requests
in flight on each replica, sends to the replica with room (power of two choices), and holds requests
in a FIFO queue while every replica is at `max_ongoing_requests`. A replica that refuses a request
(other callers filled it) sends a CAPACITY frame as soon as it has room again, so a waiting request
never sleeps on a backoff timer.

A lost replica connection: a request written on it fails with `ReplicaDiedError` and is never sent
again (it may be what killed the replica: a poison request kills at most one replica). Requests
still queued here go to the other replicas. The one exception makes graceful shutdown lossless: a
replica that starts draining sends a `draining` notice on each data connection carrying the highest
request id it accepted there (0: none still running); from then on it only rejects new requests,
finishes the accepted ones and closes. Requests with a higher id than that were rejected or never
read, so when such a connection is lost those still unanswered are sent to another replica.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from typing import Any, Optional

from shoal.common import DeploymentID, DeploymentTargets, RunningReplicaInfo
from shoal.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaDiedError,
    RequestCancelledError,
)
from shoal.router.base import RequestRouter, load_router_class
from shoal.router.pow2 import MODEL_MATCH_WINDOW_S, PowerOfTwoChoicesRequestRouter
from shoal.telemetry.serve_metrics import router_cell
from shoal.transport import serialization as ser
from shoal.transport.connection import TCP_PREFIX, Connection, ConnectionLost, connect
from shoal.transport.framing import Kind

logger = logging.getLogger(__name__)


_REQUEST_TYPES: tuple = ()

# A new router holds its requests until its first attempt to connect to each replica it was told about
# has ended (connected or failed), however long a starved caller takes to get there. Only an attempt
# that hangs ends the wait sooner: over TCP after 1 s (a host that does not answer); on this machine
# after 10 s (a local connect succeeds or fails at once, unless the replica stopped accepting).
WARMING_CAP_TCP_S = 1.0
WARMING_CAP_LOCAL_S = 10.0


def _request_types() -> tuple:
    """The response classes (imported lazily: handle.py imports this module)."""
    global _REQUEST_TYPES
    if not _REQUEST_TYPES:
        from shoal.handle import _Request

        _REQUEST_TYPES = (_Request,)
    return _REQUEST_TYPES


class ReplicaEntry:
    """The router's view of one replica (what router policies see as a `ReplicaView`)."""

    __slots__ = ("info", "conn", "inflight", "max_ongoing", "blocked", "draining", "router", "models",
                 "replica_id", "node_id", "last_accepted", "unread")

    def __init__(self, info: RunningReplicaInfo, router: "Router"):
        self.info = info
        self.replica_id = info.replica_id
        self.node_id = info.node_id
        self.conn: Optional[Connection] = None
        self.inflight = 0
        self.max_ongoing = info.max_ongoing_requests
        self.blocked = False
        self.draining = False
        self.router = router
        # Models the replica reported, plus those this caller just sent it (it is loading them).
        self.models: set = set(info.multiplexed_model_ids)
        # Set by the replica's `draining` notice: the highest request id it accepted on this
        # connection. `unread` collects the later ones a lost connection leaves unanswered.
        self.last_accepted: Optional[int] = None
        self.unread: list = []

    def has_capacity(self) -> bool:
        return not self.blocked and self.inflight < self.max_ongoing

    @property
    def queue_len(self) -> int:
        return self.inflight

    @property
    def max_ongoing_requests(self) -> int:
        return self.max_ongoing

    @property
    def multiplexed_model_ids(self) -> set:
        return self.models

    # Connection handler hooks (the replica never sends us requests).
    def on_request(self, conn, rid, body):  # pragma: no cover - protocol violation
        logger.warning("replica %s sent a request to a router", self.info.replica_id)

    def on_cancel(self, conn, rid):  # pragma: no cover
        pass

    def on_notify(self, conn, topic, payload):
        if topic == "draining":
            self.router._on_draining(self, payload)

    def on_connection_lost(self, conn, exc):
        self.router._on_replica_lost(self)


class _Call:
    """Routes the frames answering one request back to its response object."""

    __slots__ = ("router", "entry", "resp", "rid")

    def __init__(self, router: "Router", entry: ReplicaEntry, resp):
        self.router = router
        self.entry = entry
        self.resp = resp
        self.rid = 0

    def on_frame(self, kind: int, body: bytes) -> None:
        resp = self.resp
        if kind == Kind.OK:  # the common case first
            resp._call = None
            try:
                value = ser.loads(body)
            except Exception as e:  # noqa: BLE001
                resp._complete(exc=RuntimeError(f"Could not deserialize the result of request {resp.request_id}: {e!r}"))
            else:
                resp._complete(value)
            self.router._release(self.entry)
            return
        if kind == Kind.ITEM:
            try:
                resp._push(ser.loads(body))
            except Exception as e:  # noqa: BLE001
                resp._complete(exc=e)
            return
        router = self.router
        resp._call = None
        if kind == Kind.REJECT:
            router._on_reject(self.entry, resp)
            return
        if kind == Kind.ERROR:
            resp._complete(exc=ser.loads_exception(body))
        elif kind == Kind.END:
            resp._complete()
        router._release(self.entry)

    def on_lost(self, exc: BaseException) -> None:
        """The connection closed with this request unanswered: it fails, unless the replica announced
        draining before it accepted this request (then it never ran there and another replica takes it)."""
        resp = self.resp
        resp._call = None
        entry = self.entry
        self.router._release(entry, lost=True)
        if entry.last_accepted is not None and self.rid > entry.last_accepted and not self.router.closed:
            entry.unread.append(resp)  # re-queued by `_on_replica_lost`, which runs right after
            return
        rid = entry.info.replica_id
        resp._complete(exc=ReplicaDiedError(
            f"Replica '{rid.unique_id}' of deployment '{rid.deployment_id.name}' in application "
            f"'{rid.deployment_id.app_name}' died while handling request {resp.request_id} "
            f"(method '{resp.method_name}'). The replica is being replaced; retry the request."
        ))


class _FailingPolicy(RequestRouter):
    """The deployment's router class could not be imported or constructed: every request fails with why."""

    def __init__(self, error: BaseException):
        self.error = error

    def choose_replica(self, candidates, request):
        try:
            error = copy.copy(self.error)  # each request its own exception (tracebacks would pile up)
        except Exception:  # noqa: BLE001
            error = self.error
        raise error.with_traceback(None)


class Router:
    def __init__(self, deployment_id: DeploymentID, loop: asyncio.AbstractEventLoop):
        self.deployment_id = deployment_id
        self.loop = loop
        self.entries: dict[str, ReplicaEntry] = {}
        self.ready: list[ReplicaEntry] = []
        self.pending: deque = deque()
        self.max_queued_requests = -1
        self.autoscaling = False
        self.backpressure_status_code = 503
        self.backpressure_retry_after_s: Optional[float] = None
        self.exists: Optional[bool] = None
        self.closed = False
        self.policy: RequestRouter = PowerOfTwoChoicesRequestRouter()
        self._policy_key: tuple = ("shoal.router.pow2:PowerOfTwoChoicesRequestRouter", (), ())
        # A Ray-style router's driver (shoal/request_router.py): told when requests queue or leave.
        self._async_policy = None
        self._rematch_timer: Optional[asyncio.TimerHandle] = None
        # A new router holds requests until it has tried to connect to every replica it was told
        # about, so policies see the whole set from the first request (affinity needs it).
        self._warming = False
        self._untried: set[str] = set()  # replicas whose first connection attempt has not ended
        self.on_queued_without_replicas = None  # set by the client: tells the controller at once
        self.sync_loop = None  # set when sync callers drive this router's loop (see sync_loop.py)
        self._background = 0  # connects and argument resolutions in progress
        # Metrics: requests this process sent to the deployment (ray_serve_num_router_requests), in a
        # cell shared by the process's routers of the deployment (and route), which outlives them.
        self.requests_cell = router_cell(deployment_id)

    # --- requests -----------------------------------------------------------------------------
    def assign(self, resp) -> None:
        """Send `resp` to a replica now, or queue it. Runs on `self.loop`."""
        self.requests_cell[0] += 1
        if resp._cancelled:
            resp._complete(exc=RequestCancelledError(resp.request_id))
            return
        if self.exists is False:
            resp._complete(exc=self._unavailable())
            return
        if resp.payload is None and self._has_response_args(resp):
            self._background += 1
            self.loop.create_task(self._resolve_then_assign(resp))
            return
        if not self.pending and not self._warming:
            try:
                entry = self.policy.choose_replica(self.ready, resp) if self.ready else None
            except Exception as e:  # noqa: BLE001 - a router that raises fails the request with its error
                resp._complete(exc=e)
                return
            if entry is not None:
                self._send(entry, resp)
                return
        if self.max_queued_requests != -1 and len(self.pending) >= self.max_queued_requests:
            resp._complete(exc=BackPressureError(num_queued_requests=len(self.pending),
                                                 max_queued_requests=self.max_queued_requests))
            return
        resp._queued_at = time.monotonic()
        self.pending.append(resp)
        if self._async_policy is not None:
            self._async_policy.queued(resp)
        if resp.multiplexed_model_id and self.ready:
            self._schedule_rematch()
        if not self.ready and self.on_queued_without_replicas is not None:
            self.on_queued_without_replicas(self)

    @staticmethod
    def _has_response_args(resp) -> bool:
        for a in resp.args:
            if isinstance(a, _request_types()):
                return True
        if resp.kwargs:
            for a in resp.kwargs.values():
                if isinstance(a, _request_types()):
                    return True
        return False

    async def _resolve_then_assign(self, resp) -> None:
        """Wait for upstream responses passed as top-level arguments, then send their values."""
        from shoal.handle import DeploymentResponse, DeploymentResponseGenerator

        try:
            for a in list(resp.args) + list(resp.kwargs.values()):
                if isinstance(a, DeploymentResponseGenerator):
                    raise TypeError("`DeploymentResponseGenerator` cannot be passed to another deployment call; "
                                    "only `DeploymentResponse` objects can be passed as arguments.")
            resp.args = tuple([await a if isinstance(a, DeploymentResponse) else a for a in resp.args])
            resp.kwargs = {k: (await v if isinstance(v, DeploymentResponse) else v) for k, v in resp.kwargs.items()}
        except BaseException as e:  # noqa: BLE001 - the upstream error becomes this call's error
            resp._complete(exc=e)
            return
        finally:
            self._background -= 1
        self.requests_cell[0] -= 1  # counted when it first came to `assign`
        self.assign(resp)

    def _send(self, entry: ReplicaEntry, resp, call_cls: type = _Call) -> None:
        try:
            body = resp.payload
            if body is None:
                body = ser.dumps_call_args(
                    resp.args, resp.kwargs,
                    f"the call to method '{resp.method_name}' of deployment '{self.deployment_id.name}'",
                    (resp.method_name, resp.stream, resp.multiplexed_model_id, resp.request_id),
                )
        except BaseException as e:  # noqa: BLE001
            resp._complete(exc=e)
            return
        call = call_cls(self, entry, resp)
        try:
            call.rid = entry.conn.request(body, call)  # type: ignore[union-attr]
        except ConnectionLost:  # the replica just went away: another one takes the request
            self._on_replica_lost(entry, drain=False)
            self.pending.appendleft(resp)
            self.loop.call_soon(self._drain)
            return
        entry.inflight += 1
        resp._call = call
        if resp.multiplexed_model_id:
            entry.models.add(resp.multiplexed_model_id)  # it will load it; prefer it for the next one
        if self._policy_hooks:
            self.policy.on_request_routed(resp, entry)

    def _release(self, entry: ReplicaEntry, lost: bool = False) -> None:
        entry.inflight -= 1
        entry.blocked = False
        if entry.draining and entry.inflight == 0 and entry.conn is not None:
            entry.conn.close()
        if self.pending and not lost:
            self._drain()

    def _on_reject(self, entry: ReplicaEntry, resp) -> None:
        """The replica was full (other callers): wait for its CAPACITY frame, retry this request first."""
        entry.inflight -= 1
        entry.blocked = True
        resp._call = None
        self.pending.appendleft(resp)
        self._drain()

    def _on_draining(self, entry: ReplicaEntry, last_accepted: int) -> None:
        """The replica is shutting down: it rejects whatever it reads from now on. Stop sending to it;
        requests it never accepted go elsewhere if the connection is lost before they are answered."""
        entry.last_accepted = last_accepted
        if entry in self.ready:
            self.ready.remove(entry)

    def _on_capacity(self, conn: Connection) -> None:
        for entry in self.ready:
            if entry.conn is conn:
                entry.blocked = False
        self._drain()

    def _drain(self) -> None:
        """Send queued requests in FIFO order; a request the policy holds back (e.g. waiting for the
        replica with its model) does not block a few others behind it."""
        pending = self.pending
        skipped = 0
        while len(pending) > skipped and self.ready and not self._warming:
            resp = pending[skipped]
            if resp._cancelled:
                del pending[skipped]
                continue
            try:
                entry = self.policy.choose_replica(self.ready, resp)
            except Exception as e:  # noqa: BLE001 - a router that raises fails the request with its error
                del pending[skipped]
                resp._complete(exc=e)
                continue
            if entry is None:
                if not resp.multiplexed_model_id or not any(e.has_capacity() for e in self.ready):
                    return
                # Held back for its model while some replica has room: look again when its wait for the
                # model's replicas ends (the timer may not run yet: it was queued before any replica was).
                if self._rematch_timer is None:
                    self._schedule_rematch()
                if skipped >= 16:
                    return
                skipped += 1
                continue
            del pending[skipped]
            self._send(entry, resp)

    def _schedule_rematch(self) -> None:
        """Re-run the queue when a multiplexed request's wait for its model's replica runs out."""
        if self._rematch_timer is None:
            def fire() -> None:
                self._rematch_timer = None
                self._drain()
                if any(r.multiplexed_model_id for r in self.pending):
                    self._schedule_rematch()

            self._rematch_timer = self.loop.call_later(MODEL_MATCH_WINDOW_S + 0.01, fire)

    def cancel(self, resp) -> None:
        """Drop `resp` from the queue, or tell its replica to stop working on it."""
        try:
            self.pending.remove(resp)
        except ValueError:
            pass
        if self._async_policy is not None:
            self._async_policy.forget(resp)
        call = resp._call
        if call is not None:
            resp._call = None
            if call.entry.conn is not None:
                call.entry.conn.cancel(call.rid)
            self._release(call.entry)
        resp._complete(exc=RequestCancelledError(resp.request_id))

    # --- replica set --------------------------------------------------------------------------
    def update(self, targets: DeploymentTargets) -> None:
        """Apply the replica set the controller published. Runs on `self.loop`."""
        self.exists = targets.exists
        self.autoscaling = targets.autoscaling
        self.max_queued_requests = targets.max_queued_requests
        self.backpressure_status_code = targets.backpressure_status_code
        self.backpressure_retry_after_s = targets.backpressure_retry_after_s
        self._set_policy(targets.request_router_class, targets.request_router_kwargs,
                         getattr(targets, "request_router_backoff", ()))
        if not targets.exists:
            for entry in list(self.entries.values()):
                self._retire(entry)
            pending, self.pending = self.pending, deque()
            for resp in pending:
                if self._async_policy is not None:
                    self._async_policy.forget(resp)
                resp._complete(exc=self._unavailable())
            return
        new_ids = {r.replica_id.unique_id: r for r in targets.replicas}
        for uid, entry in list(self.entries.items()):
            if uid not in new_ids:
                self._retire(entry)
            else:
                info = new_ids[uid]
                entry.info = info
                entry.max_ongoing = info.max_ongoing_requests
                entry.models = set(info.multiplexed_model_ids)
        new = [info for uid, info in new_ids.items() if uid not in self.entries]
        if not self.ready and new:
            self._warming = True
            self._untried.update(info.replica_id.unique_id for info in new)
            tcp = any(info.address.startswith(TCP_PREFIX) for info in new)
            self.loop.call_later(WARMING_CAP_TCP_S if tcp else WARMING_CAP_LOCAL_S, self._end_warming)
        for uid, info in new_ids.items():
            if uid not in self.entries:
                entry = ReplicaEntry(info, self)
                self.entries[uid] = entry
                self._background += 1
                task = self.loop.create_task(self._connect(entry))
                task.add_done_callback(self._background_done)
        if self._policy_hooks:
            self.policy.update_replicas(self.ready)
        self._drain()

    _policy_hooks = False  # whether the policy overrides the on_request_routed / update_replicas hooks

    def _set_policy(self, class_path: str, kwargs: tuple, backoff: tuple = ()) -> None:
        key = (class_path, kwargs, backoff)
        if key == self._policy_key:
            return
        self._policy_key = key
        if self._async_policy is not None:
            self._async_policy.stop()
            self._async_policy = None
        try:
            cls = load_router_class(class_path)
            if issubclass(cls, RequestRouter):
                self.policy = cls(**dict(kwargs))
            else:  # Ray's interface (shoal.request_router): async choose_replicas, run in tasks
                from shoal.request_router import RayRouterDriver

                self.policy = self._async_policy = RayRouterDriver(self, cls, dict(kwargs), backoff)
        except Exception as e:  # noqa: BLE001 - requests fail with the error, as in Ray, instead of hanging
            logger.error("could not load request router %s for %s: %r; its requests fail with this error",
                         class_path, self.deployment_id, e)
            self.policy = _FailingPolicy(e)
        cls = type(self.policy)
        self._policy_hooks = self._async_policy is None and (
            cls.on_request_routed is not RequestRouter.on_request_routed
            or cls.update_replicas is not RequestRouter.update_replicas)

    def _end_warming(self) -> None:
        self._untried.clear()
        if self._warming:
            self._warming = False
            self._drain()

    def _first_try_over(self, entry: ReplicaEntry) -> None:
        """The first connection attempt to `entry` ended: stop holding requests once all have."""
        self._untried.discard(entry.info.replica_id.unique_id)
        if self._warming and not self._untried:
            self._end_warming()

    def _background_done(self, _task: asyncio.Task) -> None:
        self._background -= 1
        if self._warming and not any(e.conn is None and not e.draining for e in self.entries.values()):
            self._end_warming()
        if self.sync_loop is not None:
            self.sync_loop.wake()

    async def _connect(self, entry: ReplicaEntry) -> None:
        delay = 0.02
        for attempt in range(8):
            if entry.draining:
                self._first_try_over(entry)
                return
            try:
                conn = await connect(entry.info.address, handler=entry, name=str(entry.info.replica_id),
                                          on_capacity=self._on_capacity, immediate=self.sync_loop is not None)
            except OSError:
                self._first_try_over(entry)  # requests need not wait for the retries
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            if entry.draining:
                conn.close()
                self._first_try_over(entry)
                return
            entry.conn = conn
            self.ready.append(entry)
            self._first_try_over(entry)
            self._drain()
            return
        logger.warning("could not connect to replica %s at %s", entry.info.replica_id, entry.info.address)
        self.entries.pop(entry.info.replica_id.unique_id, None)

    def _retire(self, entry: ReplicaEntry) -> None:
        """Stop sending to a replica the controller removed; close once its requests are done."""
        entry.draining = True
        self.entries.pop(entry.info.replica_id.unique_id, None)
        if entry in self.ready:
            self.ready.remove(entry)
        if entry.conn is not None and entry.inflight == 0:
            entry.conn.close()

    def _on_replica_lost(self, entry: ReplicaEntry, drain: bool = True) -> None:
        """Never pick the replica again; requests it never accepted (see `_Call.on_lost`) go first."""
        if entry in self.ready:
            self.ready.remove(entry)
        if self.entries.get(entry.info.replica_id.unique_id) is entry:
            del self.entries[entry.info.replica_id.unique_id]
        if entry.unread:
            self.pending.extendleft(reversed(entry.unread))
            entry.unread = []
        if drain:
            self._drain()

    def _unavailable(self) -> DeploymentUnavailableError:
        d = self.deployment_id
        return DeploymentUnavailableError(f"Deployment '{d.name}' in application '{d.app_name}' does not exist.")

    def busy(self) -> bool:
        """Work that must progress before requests are sent (queued, connecting, resolving arguments)."""
        return bool(self.pending) or self._background > 0

    def in_flight(self) -> bool:
        return any(e.inflight for e in self.entries.values())

    def num_queued(self) -> int:
        return len(self.pending)

    def load(self) -> tuple[int, int]:
        """(queued, running) requests of this caller, for autoscaling."""
        return len(self.pending), sum(e.inflight for e in self.entries.values())

    def close(self) -> None:
        """Close every replica connection (also after the router's loop has been closed)."""
        self.closed = True
        if self._async_policy is not None:
            self._async_policy.stop()
        for entry in list(self.entries.values()) + self.ready:
            entry.draining = True
            if entry.conn is not None:
                _close_connection(entry.conn, self.loop)
        self.entries.clear()
        self.ready.clear()


def _close_connection(conn: Connection, loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_closed():
        conn.close()
        return
    # The loop that owned it is gone (e.g. `asyncio.run` returned): close the socket itself.
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    raw = getattr(sock, "_sock", sock)
    try:
        raw.close()
    except Exception:  # noqa: BLE001 - nothing more we can do for a foreign transport
        pass
