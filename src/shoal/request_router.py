"""Ray Serve's request-router interface (`ray.serve.request_router`), so Ray's custom routers run unchanged.

Subclass `RequestRouter` (optionally with `FIFOMixin`, `LocalityMixin`, `MultiplexMixin`), implement

    async def choose_replicas(self, candidate_replicas, pending_request) -> List[List[RunningReplica]]

and name the class in `request_router_config={"request_router_class": "my_module:MyRouter"}`. The
returned lists are ranks, best first: the request goes to the least loaded replica with room in the
first rank that has one; when none has room the router tries again, at once when room frees up, else
after a backoff (`initial_backoff_s`, `backoff_multiplier`, `max_backoff_s` of the router config).
Hooks: `initialize_state(**request_router_kwargs)`, `update_replicas`, `on_request_routed`,
`on_request_completed`, `on_replica_actor_died`. A router that raises fails the request with its error.

shoal's own interface (`shoal.router.base.RequestRouter`, a synchronous `choose_replica`) stays
the faster path; a Ray-style router runs its `choose_replicas` in a task per queued request
(`RayRouterDriver` below), as Ray does.

`RunningReplica` here is a view of the caller's connection to one replica: `queue_len` is this
caller's count of requests in flight there (exact, not a probed estimate), which is what
`select_available_replicas` and the choice within a rank use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, DefaultDict, Deque, Dict, List, Optional, Set

from shoal import common as _common
from shoal.common import DeploymentID, ReplicaID
from shoal.router.base import RequestRouter as _ShoalPolicy

if TYPE_CHECKING:
    from shoal.router.router import ReplicaEntry, Router

logger = logging.getLogger("shoal.router")

__all__ = ["FIFOMixin", "LocalityMixin", "MultiplexMixin", "PendingRequest", "ReplicaID", "ReplicaResult",
           "RequestRouter", "RunningReplica"]

# How long a multiplexed request looks only at replicas holding its model (Ray: U(1, 2) x this).
MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S = 1.0
# Queue length entries older than this are not trusted (Ray's RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S).
QUEUE_LENGTH_CACHE_TIMEOUT_S = 10.0


class DeploymentHandleSource(str, enum.Enum):
    UNKNOWN = "UNKNOWN"
    PROXY = "PROXY"
    REPLICA = "REPLICA"


@dataclass
class RequestMetadata:
    """What a router knows about a request besides its arguments (Ray's fields)."""

    request_id: str
    internal_request_id: str = ""
    call_method: str = "__call__"
    multiplexed_model_id: str = ""
    is_streaming: bool = False
    app_name: str = ""
    route: str = ""
    session_id: str = ""  # shoal: the `x-session-id` header, or a handle's `session_id` option

    def __post_init__(self) -> None:
        if not self.internal_request_id:
            self.internal_request_id = self.request_id


@dataclass
class RequestRoutingContext:
    multiplexed_start_matching_time: Optional[float] = None
    tried_fewest_multiplexed_models: bool = False
    tried_first_multiplexed_models: bool = False
    tried_same_node: bool = False
    tried_same_az: bool = False
    should_backoff: bool = False


def _new_future() -> Any:
    try:
        return asyncio.get_running_loop().create_future()
    except RuntimeError:
        return concurrent.futures.Future()


@dataclass
class PendingRequest:
    """A request waiting for a replica."""

    args: List[Any]
    kwargs: Dict[Any, Any]
    metadata: RequestMetadata
    created_at: float = field(default_factory=time.time)
    future: Any = field(default_factory=_new_future)
    routing_context: RequestRoutingContext = field(default_factory=RequestRoutingContext)
    resolved: bool = False

    def reset_future(self) -> None:
        self.future = _new_future()


class ReplicaResult:
    """What `on_request_routed` gets as `result`: in shoal, the request's response object
    (a `DeploymentResponse`, `DeploymentResponseGenerator`, or the HTTP proxy's call)."""


class RunningReplica:
    """One replica as a router sees it."""

    __slots__ = ("_entry",)

    def __init__(self, entry: "ReplicaEntry"):
        self._entry = entry

    @property
    def replica_id(self) -> ReplicaID:
        return self._entry.replica_id

    @property
    def node_id(self) -> str:
        return self._entry.node_id

    @property
    def availability_zone(self) -> Optional[str]:
        return None

    @property
    def multiplexed_model_ids(self) -> Set[str]:
        return self._entry.models

    @property
    def routing_stats(self) -> Dict[str, Any]:
        return dict(getattr(self._entry.info, "routing_stats", None) or {})

    @property
    def replica_metadata(self) -> Dict[str, Any]:
        return dict(getattr(self._entry.info, "replica_metadata", None) or {})

    @property
    def max_ongoing_requests(self) -> int:
        return self._entry.max_ongoing

    @property
    def is_cross_language(self) -> bool:
        return False

    @property
    def actor_id(self) -> None:
        return None

    @property
    def queue_len(self) -> int:
        """Requests this caller has in flight on the replica (shoal)."""
        return self._entry.inflight

    def has_capacity(self) -> bool:
        """Room for one more request from this caller, and not shutting down (shoal)."""
        e = self._entry
        return (e.has_capacity() and not e.draining and e.last_accepted is None and e.conn is not None
                and not e.conn.closed)

    def __repr__(self) -> str:
        rid = self.replica_id
        return f"RunningReplica(id='{rid.unique_id}', deployment='{rid.deployment_id.name}')"


@dataclass(frozen=True)
class _CacheEntry:
    queue_len: int
    timestamp: float


class ReplicaQueueLengthCache:
    def __init__(self, *, staleness_timeout_s: float = QUEUE_LENGTH_CACHE_TIMEOUT_S,
                 get_curr_time_s: Optional[Callable[[], float]] = None):
        self._cache: Dict[ReplicaID, _CacheEntry] = {}
        self._staleness_timeout_s = staleness_timeout_s
        self._now = get_curr_time_s or time.time

    def get(self, replica_id: ReplicaID) -> Optional[int]:
        entry = self._cache.get(replica_id)
        if entry is None or self._now() - entry.timestamp > self._staleness_timeout_s:
            return None
        return entry.queue_len

    def update(self, replica_id: ReplicaID, queue_len: int) -> None:
        self._cache[replica_id] = _CacheEntry(queue_len, self._now())

    def invalidate_key(self, replica_id: ReplicaID) -> None:
        self._cache.pop(replica_id, None)

    def remove_inactive_replicas(self, *, active_replica_ids: Set[ReplicaID]) -> None:
        for rid in list(self._cache):
            if rid not in active_replica_ids:
                del self._cache[rid]


# --- mixins -------------------------------------------------------------------------------------

class LocalityScope(str, enum.Enum):
    NODE = "NODE"
    AVAILABILITY_ZONE = "AVAILABILITY_ZONE"


class LocalityMixin:
    """Ranks replicas by where they run: this caller's node first."""

    def __init__(self, self_node_id: Optional[str] = None, prefer_local_node_routing: bool = False,
                 prefer_local_az_routing: bool = False, self_availability_zone: Optional[str] = None,
                 *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._self_node_id = self_node_id
        self._prefer_local_node_routing = prefer_local_node_routing
        self._prefer_local_az_routing = prefer_local_az_routing
        self._self_availability_zone = self_availability_zone
        self._colocated_replica_ids: DefaultDict[LocalityScope, Set[ReplicaID]] = defaultdict(set)
        self._replica_id_set: Set[ReplicaID] = set()

    def _discard_colocated_replica_ids_on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        for ids in self._colocated_replica_ids.values():
            ids.discard(replica_id)

    def _update_colocated_replica_ids_with_replicas(self, replicas: List[RunningReplica]) -> None:
        colocated: DefaultDict[LocalityScope, Set[ReplicaID]] = defaultdict(set)
        for r in replicas:
            if self._self_node_id is not None and r.node_id == self._self_node_id:
                colocated[LocalityScope.NODE].add(r.replica_id)
            if self._self_availability_zone is not None and r.availability_zone == self._self_availability_zone:
                colocated[LocalityScope.AVAILABILITY_ZONE].add(r.replica_id)
        self._colocated_replica_ids = colocated

    def apply_locality_routing(self, pending_request: Optional[PendingRequest] = None) -> Set[ReplicaID]:
        """Candidate ids: this node's once, then this zone's once, then all (and back off)."""
        if not pending_request:
            return self._replica_id_set
        ctx = pending_request.routing_context
        if (self._prefer_local_node_routing and not ctx.tried_same_node
                and self._colocated_replica_ids[LocalityScope.NODE]):
            ctx.tried_same_node, ctx.should_backoff = True, False
            return self._colocated_replica_ids[LocalityScope.NODE]
        if (self._prefer_local_az_routing and not ctx.tried_same_az
                and self._colocated_replica_ids[LocalityScope.AVAILABILITY_ZONE]):
            ctx.tried_same_az, ctx.should_backoff = True, False
            return self._colocated_replica_ids[LocalityScope.AVAILABILITY_ZONE]
        ctx.should_backoff = True
        return self._replica_id_set

    def rank_replicas_via_locality(self, replicas: List[RunningReplica]) -> List[List[RunningReplica]]:
        """[same node, same availability zone, the others]."""
        ranks: List[List[RunningReplica]] = [[], [], []]
        node = self._colocated_replica_ids[LocalityScope.NODE]
        zone = self._colocated_replica_ids[LocalityScope.AVAILABILITY_ZONE]
        for r in replicas:
            ranks[0 if r.replica_id in node else 1 if r.replica_id in zone else 2].append(r)
        return ranks


class MultiplexMixin:
    """Ranks replicas by the multiplexed models they hold."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._multiplexed_model_id_to_replica_ids: DefaultDict[str, Set[ReplicaID]] = defaultdict(set)
        self._multiplexed_model_id_fallback_match: Set[str] = set()
        self._replica_id_set = set()
        self._replicas: Dict[ReplicaID, RunningReplica] = {}

    def _get_pending_request_matching_multiplexed_model_id(
            self, request_metadata: Optional[RequestMetadata] = None) -> Optional[PendingRequest]:
        if request_metadata is None or not request_metadata.multiplexed_model_id:
            return None
        queue = self._pending_requests_by_model_id.get(request_metadata.multiplexed_model_id)  # type: ignore[attr-defined]
        while queue:
            if not queue[0].future.done():
                return queue[0]
            queue.popleft()
        return None

    def _discard_multiplexed_replica_ids_on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        for ids in self._multiplexed_model_id_to_replica_ids.values():
            ids.discard(replica_id)

    def _update_multiplexed_model_ids_with_replicas(self, replicas: List[RunningReplica]) -> None:
        by_model: DefaultDict[str, Set[ReplicaID]] = defaultdict(set)
        for r in replicas:
            for model_id in r.multiplexed_model_ids:
                by_model[model_id].add(r.replica_id)
        self._multiplexed_model_id_to_replica_ids = by_model

    def _get_replica_ids_with_fewest_multiplexed_models(self) -> Set[ReplicaID]:
        if not self._replicas:
            return set()
        fewest = min(len(r.multiplexed_model_ids) for r in self._replicas.values())
        return {rid for rid, r in self._replicas.items() if len(r.multiplexed_model_ids) == fewest}

    @property
    def _multiplexed_matching_timeout(self) -> float:
        return random.uniform(MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S, 2 * MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S)

    def apply_multiplex_routing(self, pending_request: Optional[PendingRequest] = None) -> Set[ReplicaID]:
        """Candidate ids: replicas holding the model (or, for a model nobody holds, those holding the
        fewest models) within the matching window; then the fewest once; then all."""
        if not pending_request:
            return self._replica_id_set
        ctx = pending_request.routing_context
        if not ctx.multiplexed_start_matching_time:
            ctx.multiplexed_start_matching_time = time.time()
        model_id = pending_request.metadata.multiplexed_model_id
        if time.time() - ctx.multiplexed_start_matching_time < self._multiplexed_matching_timeout:
            ids = self._multiplexed_model_id_to_replica_ids.get(model_id, set())
            if (not ids and model_id not in self._multiplexed_model_id_fallback_match) \
                    or ctx.tried_first_multiplexed_models:
                ids = self._get_replica_ids_with_fewest_multiplexed_models()
                self._multiplexed_model_id_fallback_match.add(model_id)
            elif ids:
                self._multiplexed_model_id_fallback_match.discard(model_id)
            ctx.tried_first_multiplexed_models = True
        elif not ctx.tried_fewest_multiplexed_models:
            ids = self._get_replica_ids_with_fewest_multiplexed_models()
            ctx.tried_fewest_multiplexed_models = True
        else:
            ids = self._replica_id_set
        ctx.should_backoff = True
        return ids

    def rank_replicas_via_multiplex(self, replicas: List[RunningReplica],
                                    multiplexed_model_id: str) -> List[List[RunningReplica]]:
        """[replicas holding the model, those holding the fewest models, the others]."""
        holders = self._multiplexed_model_id_to_replica_ids.get(multiplexed_model_id, set())
        fewest = self._get_replica_ids_with_fewest_multiplexed_models()
        ranks: List[List[RunningReplica]] = [[], [], []]
        for r in replicas:
            ranks[0 if r.replica_id in holders else 1 if r.replica_id in fewest else 2].append(r)
        return ranks


class FIFOMixin:
    """A replica found for any request goes to the oldest waiting one (one with the same multiplexed
    model first) instead of the request it was found for."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]

    def _get_pending_request_matching_metadata(
            self, request_metadata: Optional[RequestMetadata] = None) -> Optional[PendingRequest]:
        if hasattr(self, "_get_pending_request_matching_multiplexed_model_id"):
            return self._get_pending_request_matching_multiplexed_model_id(request_metadata)
        return None


# --- the router ---------------------------------------------------------------------------------

class RequestRouter(ABC):
    """Ray Serve's request router base class (see the module docstring)."""

    max_num_routing_tasks_cap = 50

    def __init__(self, deployment_id: DeploymentID, handle_source: Any = DeploymentHandleSource.UNKNOWN,
                 self_actor_id: Optional[str] = None, self_actor_handle: Any = None,
                 use_replica_queue_len_cache: bool = True, get_curr_time_s: Optional[Callable[[], float]] = None,
                 create_replica_wrapper_func: Optional[Callable] = None, initial_backoff_s: float = 0.025,
                 backoff_multiplier: float = 2.0, max_backoff_s: float = 0.5, *args: Any, **kwargs: Any):
        self._deployment_id = deployment_id
        self._handle_source = handle_source
        self._self_actor_id = self_actor_id
        self._self_actor_handle = self_actor_handle
        self._use_replica_queue_len_cache = use_replica_queue_len_cache
        self._get_curr_time_s = get_curr_time_s or time.time
        self._create_replica_wrapper_func = create_replica_wrapper_func
        self.initial_backoff_s = initial_backoff_s
        self.backoff_multiplier = backoff_multiplier
        self.max_backoff_s = max_backoff_s
        self._replica_id_set: Set[ReplicaID] = set()
        self._replicas: Dict[ReplicaID, RunningReplica] = {}
        self._replicas_list: List[RunningReplica] = []
        self._replica_queue_len_cache = ReplicaQueueLengthCache(get_curr_time_s=get_curr_time_s)
        self._pending_requests_to_fulfill: Deque[PendingRequest] = deque()
        self._pending_requests_to_route: Deque[PendingRequest] = deque()
        self._pending_requests_by_id: Dict[str, PendingRequest] = {}
        self._pending_requests_by_model_id: DefaultDict[str, Deque[PendingRequest]] = defaultdict(deque)
        self._lazily_constructed_replicas_updated_event: Optional[asyncio.Event] = None
        self._lazily_fetched_loop: Optional[asyncio.AbstractEventLoop] = None
        self._room_event: Optional[asyncio.Event] = None  # shoal: set when room may have freed up
        self._refresh: Optional[Callable[[], None]] = None  # shoal: brings `_replicas` up to date

    # --- configuration ------------------------------------------------------------------------
    def initialize_state(self, **kwargs: Any) -> None:
        """Receives `request_router_kwargs`."""

    @property
    def supports_rejection_protocol(self) -> bool:
        return True

    def update_backoff_params(self, initial_backoff_s: Optional[float], backoff_multiplier: Optional[float],
                              max_backoff_s: Optional[float]) -> None:
        if initial_backoff_s is not None:
            self.initial_backoff_s = initial_backoff_s
        if backoff_multiplier is not None:
            self.backoff_multiplier = backoff_multiplier
        if max_backoff_s is not None:
            self.max_backoff_s = max_backoff_s

    def _compute_backoff_s(self, attempt: int) -> float:
        try:
            return min(self.initial_backoff_s * (self.backoff_multiplier ** attempt), self.max_backoff_s)
        except OverflowError:
            return self.max_backoff_s

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(self._compute_backoff_s(attempt))

    # --- state --------------------------------------------------------------------------------
    @property
    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._lazily_fetched_loop is None:
            self._lazily_fetched_loop = asyncio.get_running_loop()
        return self._lazily_fetched_loop

    @property
    def _replicas_updated_event(self) -> asyncio.Event:
        if self._lazily_constructed_replicas_updated_event is None:
            self._lazily_constructed_replicas_updated_event = asyncio.Event()
        return self._lazily_constructed_replicas_updated_event

    @property
    def num_pending_requests(self) -> int:
        return len(self._pending_requests_to_fulfill)

    @property
    def curr_num_routing_tasks(self) -> int:
        return len(self._pending_requests_to_route)

    @property
    def max_num_routing_tasks(self) -> int:
        return min(self.max_num_routing_tasks_cap, max(2, 2 * len(self._replicas)))

    @property
    def curr_replicas(self) -> Dict[ReplicaID, RunningReplica]:
        return self._replicas

    @property
    def app_name(self) -> str:
        return self._deployment_id.app_name

    @property
    def replica_queue_len_cache(self) -> ReplicaQueueLengthCache:
        return self._replica_queue_len_cache

    def create_replica_wrapper(self, replica_info: Any) -> RunningReplica:
        assert self._create_replica_wrapper_func is not None
        return self._create_replica_wrapper_func(replica_info)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        """The replicas this caller can send to changed (new ones connected, old ones gone)."""
        if hasattr(self, "_update_colocated_replica_ids_with_replicas"):
            self._update_colocated_replica_ids_with_replicas(replicas)
        if hasattr(self, "_update_multiplexed_model_ids_with_replicas"):
            self._update_multiplexed_model_ids_with_replicas(replicas)
        self._replicas = {r.replica_id: r for r in replicas}
        self._replicas_list = list(self._replicas.values())
        self._replica_id_set = set(self._replicas)
        self._replica_queue_len_cache.remove_inactive_replicas(active_replica_ids=self._replica_id_set)
        self._replicas_updated_event.set()
        self._room()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        self._replicas.pop(replica_id, None)
        self._replicas_list = list(self._replicas.values())
        self._replica_id_set.discard(replica_id)
        if hasattr(self, "_discard_colocated_replica_ids_on_replica_actor_died"):
            self._discard_colocated_replica_ids_on_replica_actor_died(replica_id)
        if hasattr(self, "_discard_multiplexed_replica_ids_on_replica_actor_died"):
            self._discard_multiplexed_replica_ids_on_replica_actor_died(replica_id)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:
        self._replica_queue_len_cache.invalidate_key(replica_id)

    def on_new_queue_len_info(self, replica_id: ReplicaID, num_ongoing_requests: int) -> None:
        if self._use_replica_queue_len_cache:
            self._replica_queue_len_cache.update(replica_id, num_ongoing_requests)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        if self._use_replica_queue_len_cache:
            self._replica_queue_len_cache.update(replica_id, (self._replica_queue_len_cache.get(replica_id) or 0) + 1)

    def decrement_queue_len_cache(self, replica_id: ReplicaID) -> None:
        if self._use_replica_queue_len_cache:
            current = self._replica_queue_len_cache.get(replica_id)
            if current is not None:
                self._replica_queue_len_cache.update(replica_id, max(0, current - 1))

    # --- choosing -----------------------------------------------------------------------------
    def _has_room(self, replica: Any) -> bool:
        if isinstance(replica, RunningReplica):
            return replica.has_capacity()
        q = self._replica_queue_len_cache.get(replica.replica_id)
        return q is None or q < replica.max_ongoing_requests

    def select_available_replicas(self, candidates: Optional[List[RunningReplica]] = None) -> List[RunningReplica]:
        """The candidates (default: every replica) with room for one more request."""
        if candidates is None:
            candidates = self._replicas_list
        return [r for r in candidates if self._has_room(r)]

    def _select_from_rank(self, rank: List[RunningReplica]) -> Optional[RunningReplica]:
        """The least loaded replica of a rank that has room (the first one on a tie)."""
        best: Optional[RunningReplica] = None
        best_len = math.inf
        for candidate in rank:
            r = self._replicas.get(getattr(candidate, "replica_id", None))  # type: ignore[arg-type]
            if r is None or not self._has_room(r):
                continue
            q = r.queue_len if isinstance(r, RunningReplica) else (
                self._replica_queue_len_cache.get(r.replica_id) or 0)
            if q < best_len:
                best, best_len = r, q
        return best

    def _room(self) -> None:
        if self._room_event is not None:
            self._room_event.set()

    async def _wait_for_room(self, timeout: float) -> None:
        """Sleep until room may have freed up (a request finished, replicas changed) or `timeout`."""
        if self._room_event is None:
            self._room_event = asyncio.Event()
        self._room_event.clear()
        try:
            await asyncio.wait_for(self._room_event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _choose_replica_for_request(self, pending_request: PendingRequest, *,
                                          is_retry: bool = False) -> RunningReplica:
        """Ask `choose_replicas` until one of the ranks it returns has a replica with room."""
        attempt = 0
        retried = False
        no_backoff = 0
        while True:
            if self._refresh is not None:
                self._refresh()
            while not self._replicas:
                self._replicas_updated_event.clear()
                await self._replicas_updated_event.wait()
            ranks = await self.choose_replicas(candidate_replicas=list(self._replicas_list),
                                               pending_request=pending_request)
            for rank in ranks or ():
                if rank:
                    chosen = self._select_from_rank(rank)
                    if chosen is not None:
                        return chosen
            if pending_request is not None and not pending_request.routing_context.should_backoff \
                    and no_backoff < 3:
                no_backoff += 1  # e.g. locality tried this node only: widen at once (a few times at most)
                await asyncio.sleep(0)
                continue
            no_backoff = 0
            if not retried:
                retried = True  # the first retry is immediate, as in Ray
                await asyncio.sleep(0)
                continue
            await self._wait_for_room(self._compute_backoff_s(attempt))
            attempt += 1

    @abstractmethod
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        """Ranked lists of candidate replicas for `pending_request`, best first."""

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Called once the request was sent to `replica_id`."""

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Called when a request sent to `replica_id` finished (answer, error, rejection or loss)."""


def is_ray_style(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, RequestRouter)


# --- running a Ray-style router inside a shoal Router -------------------------------------------

class RayRouterDriver(_ShoalPolicy):
    """The shoal `Router`'s policy when the deployment names a Ray-style router.

    Queued requests each get a routing task (at most `max_num_routing_tasks` at once) that awaits
    the router's `_choose_replica_for_request` and sends the request to the replica it returns
    (with `FIFOMixin`: the oldest waiting request gets it). Whatever the router raises fails that
    request with the error. `choose_replica` (called by the shoal Router whenever it could send)
    only wakes the tasks: requests stay in the Router's queue until a task sends them, so queue
    limits, cancellation and autoscaling metrics work as for any policy.
    """

    def __init__(self, router: "Router", cls: type, kwargs: dict, backoff: tuple = ()):
        self.router = router
        self.loop = router.loop
        options: dict = dict(zip(("initial_backoff_s", "backoff_multiplier", "max_backoff_s"), backoff))
        self.impl: RequestRouter = cls(
            deployment_id=router.deployment_id, handle_source=DeploymentHandleSource.UNKNOWN,
            self_node_id=_common.LOCAL_NODE_ID or "local", self_actor_id=None, self_actor_handle=None,
            use_replica_queue_len_cache=True, create_replica_wrapper_func=None,
            prefer_local_node_routing=False, prefer_local_az_routing=False, self_availability_zone=None,
            **options)
        self.impl.initialize_state(**kwargs)
        self.impl._refresh = self._sync_replicas
        self.fifo = isinstance(self.impl, FIFOMixin)
        self.tasks: Dict[Any, asyncio.Task] = {}
        self.requests: Dict[Any, PendingRequest] = {}
        self.wrappers: Dict[Any, RunningReplica] = {}
        self._ready_key: Any = None
        self._pump_scheduled = False
        self.stopped = False

    # Called by the shoal Router.
    def choose_replica(self, candidates: Any, request: Any) -> None:
        self.wake()
        return None

    def queued(self, resp: Any) -> None:
        if not self.router._warming:
            self.wake()

    def forget(self, resp: Any) -> None:
        """`resp` left the queue without this driver (cancelled): stop routing it."""
        task = self.tasks.pop(resp, None)
        self._done_routing(resp)
        if task is not None:
            task.cancel()

    def stop(self) -> None:
        self.stopped = True
        for resp in list(self.tasks):
            self.forget(resp)

    def wake(self) -> None:
        self.impl._room()
        if not self._pump_scheduled and not self.stopped:
            self._pump_scheduled = True
            self.loop.call_soon(self._pump)

    # Internals.
    def _sync_replicas(self) -> None:
        ready = self.router.ready
        key = tuple((id(e), id(e.models), len(e.models)) for e in ready)
        if key == self._ready_key:
            return
        self._ready_key = key
        old = self.wrappers
        self.wrappers = {e: old.get(e) or RunningReplica(e) for e in ready}
        for e in old:
            if e not in self.wrappers and self.router.entries.get(e.replica_id.unique_id) is not e:
                self._call_hook("on_replica_actor_died", e.replica_id)
        self._call_hook("update_replicas", list(self.wrappers.values()))

    def _call_hook(self, name: str, *args: Any) -> None:
        try:
            getattr(self.impl, name)(*args)
        except Exception:  # noqa: BLE001 - a hook's failure must not break routing
            logger.exception("%s.%s raised", type(self.impl).__name__, name)

    def _pump(self) -> None:
        self._pump_scheduled = False
        router = self.router
        if self.stopped or router.closed or router._warming:
            return
        self._sync_replicas()
        cap = self.impl.max_num_routing_tasks
        if len(self.tasks) >= cap:
            return
        scanned = 0
        limit = len(self.tasks) + cap
        for resp in router.pending:
            scanned += 1
            if scanned > limit or len(self.tasks) >= cap:
                break
            if resp not in self.tasks and not resp._cancelled:
                self.tasks[resp] = self.loop.create_task(self._route(resp))

    def _pending_request(self, resp: Any) -> PendingRequest:
        pr = self.requests.get(resp)
        if pr is None:
            meta = RequestMetadata(
                request_id=resp.request_id, internal_request_id=getattr(resp, "internal_request_id", ""),
                call_method=resp.method_name, is_streaming=bool(resp.stream),
                multiplexed_model_id=resp.multiplexed_model_id or "", app_name=self.router.deployment_id.app_name,
                session_id=getattr(resp, "session_id", "") or "")
            pr = self.requests[resp] = PendingRequest(list(resp.args), dict(resp.kwargs or {}), meta)
            impl = self.impl
            impl._pending_requests_to_fulfill.append(pr)
            impl._pending_requests_by_id[meta.internal_request_id] = pr
            if meta.multiplexed_model_id:
                impl._pending_requests_by_model_id[meta.multiplexed_model_id].append(pr)
        return pr

    def _done_routing(self, resp: Any) -> None:
        pr = self.requests.pop(resp, None)
        if pr is None:
            return
        impl = self.impl
        impl._pending_requests_by_id.pop(pr.metadata.internal_request_id, None)
        try:
            impl._pending_requests_to_fulfill.remove(pr)
        except ValueError:
            pass
        model = pr.metadata.multiplexed_model_id
        by_model = impl._pending_requests_by_model_id.get(model) if model else None
        if by_model is not None:
            try:
                by_model.remove(pr)
            except ValueError:
                pass
            if not by_model:
                del impl._pending_requests_by_model_id[model]
        if not pr.future.done():
            pr.future.cancel()

    def _fifo_target(self, resp: Any) -> Any:
        """The oldest queued request (one with the same multiplexed model first) still waiting."""
        model = resp.multiplexed_model_id
        first = None
        for i, r in enumerate(self.router.pending):
            if r._cancelled:
                continue
            if not model or r.multiplexed_model_id == model:
                return r
            if first is None:
                first = r
            if i >= 64:
                break
        return first if first is not None else resp

    async def _route(self, resp: Any) -> None:
        router = self.router
        pr = self._pending_request(resp)
        try:
            while True:
                replica = await self.impl._choose_replica_for_request(pr)
                if resp._cancelled or self.stopped or router.closed:
                    return
                entry = getattr(replica, "_entry", None)
                if entry is None:
                    known = self.impl._replicas.get(getattr(replica, "replica_id", None))  # type: ignore[arg-type]
                    entry = getattr(known, "_entry", None)
                if entry is None or entry.conn is None:
                    raise RuntimeError(f"{type(self.impl).__name__} chose {replica!r}, which is not one of the "
                                       f"candidate replicas of deployment '{router.deployment_id.name}'")
                target = self._fifo_target(resp) if self.fifo else resp
                try:
                    router.pending.remove(target)
                except ValueError:
                    if target is resp:
                        return  # answered meanwhile (the deployment went away, or it was cancelled)
                    continue
                target_pr = self._pending_request(target)
                if target is not resp:
                    other = self.tasks.pop(target, None)  # its own task stops: it is sent
                    if other is not None:
                        other.cancel()
                self._done_routing(target)
                router._send(entry, target, _ray_call_class())
                if target._call is not None:
                    self._call_hook("on_send_request", entry.replica_id)
                    self._call_hook("on_request_routed", target_pr, entry.replica_id, target)
                if target is resp:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the router's error is this request's error
            if not self.stopped:
                try:
                    router.pending.remove(resp)
                except ValueError:
                    pass
                else:
                    resp._complete(exc=e)
        finally:
            if self.tasks.get(resp) is asyncio.current_task():
                del self.tasks[resp]
            if resp not in self.tasks:
                self._done_routing(resp)
            if router.pending:
                self.wake()

    def completed(self, entry: "ReplicaEntry", resp: Any) -> None:
        self._call_hook("decrement_queue_len_cache", entry.replica_id)
        self._call_hook("on_request_completed", entry.replica_id,
                        getattr(resp, "internal_request_id", "") or resp.request_id)
        self.impl._room()


_RAY_CALL: Optional[type] = None


def _ray_call_class() -> type:
    """The call sink of a request a Ray-style router routed: it also tells the router when the
    request is done (made on first use: router.py imports this module lazily, and the reverse too)."""
    global _RAY_CALL
    if _RAY_CALL is None:
        from shoal.router.router import _Call
        from shoal.transport.framing import Kind

        final = (Kind.OK, Kind.ERROR, Kind.END, Kind.REJECT)

        class _RayCall(_Call):
            __slots__ = ()

            def on_frame(self, kind: int, body: bytes) -> None:
                _Call.on_frame(self, kind, body)
                if kind in final:
                    self._notify()

            def on_lost(self, exc: BaseException) -> None:
                _Call.on_lost(self, exc)
                self._notify()

            def _notify(self) -> None:
                driver = self.router.policy
                if isinstance(driver, RayRouterDriver):
                    driver.completed(self.entry, self.resp)

        _RAY_CALL = _RayCall
    return _RAY_CALL
