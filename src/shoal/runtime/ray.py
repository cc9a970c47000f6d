"""The Ray runtime: Ray starts and places shoal's processes on a cluster; shoal does the rest.

Ray's part is only placement and lifetime: the controller, every replica and every HTTP proxy is a
(detached) Ray actor, placed by its resources. Inside each actor the same code as on one machine
runs on its own event loop thread: the controller's reconcile loop, `run_replica`, `run_proxy`.
Requests and control calls never go through Ray; they use shoal's framed protocol over TCP, each
connection authenticated with the instance secret (`transport/auth.py`) before a frame is read.

The controller actor survives its own death: Ray restarts it (`max_restarts=-1`), and the new one
reloads its checkpoint from Ray's internal KV store (namespace "shoal") and adopts the worker actors
that still run, while those keep serving and reconnect (see "Restart and recovery" in
docs/architecture.md).

Imported only when the Ray runtime is chosen: the embedded path never imports `ray`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional, Union

import ray
from ray.experimental import internal_kv
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from shoal.common import ReplicaID
from shoal.exceptions import RayServeException
from shoal.runtime.base import (
    CheckpointStore,
    ReplicaProcess,
    Reservation,
    ResourceRequest,
    Runtime,
)
from shoal.runtime.ray_placement import NodeView, Placement
from shoal.transport import auth
from shoal.transport.connection import parse_tcp_address

NAMESPACE = "shoal"
CONTROLLER_NAME = "SHOAL_CONTROLLER"
HEAD_RESOURCE = "node:__internal_head__"
NODES_TTL_S = 0.5
# A node's metrics exporter that exited (it could not listen, say) is started again after this long.
EXPORTER_RETRY_S = 10.0
# How old the node list may be for what the controller asks every tick (proxies, draining nodes).
WATCH_NODES_TTL_S = 2.0
# Every node has 1 of each resource named so (Ray's implicit resources; its autoscaler counts a new
# node's as 1 too): a replica taking 1/max of its deployment's makes max_replicas_per_node a hard limit.
IMPLICIT_RESOURCE_PREFIX = "node:__internal_implicit_resource_"
# How long a driver waits for the controller actor to answer: its first start, or a restart by Ray.
START_TIMEOUT_S = 120.0

# Ray's internal KV store (in the GCS: it outlives every actor), namespace NAMESPACE:
RECORD_KEY = "controller"  # JSON: the controller actor's id, the instance secret, where it listens now
CHECKPOINT_KEY = "checkpoint"  # the controller's checkpoint (controller/checkpoint.py)
# A replica's placement group is named this + the replica's id. Placement groups are detached, so
# that a controller restart does not remove them; one the checkpoint does not know is removed then.
PLACEMENT_GROUP_PREFIX = "shoal-replica-"

logger = logging.getLogger("shoal.controller")


def _kv_get(key: str) -> Optional[bytes]:
    return internal_kv._internal_kv_get(key, namespace=NAMESPACE)


def _kv_put(key: str, value: bytes) -> None:
    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)


def _kv_del(key: str) -> None:
    internal_kv._internal_kv_del(key, namespace=NAMESPACE)


class KVCheckpointStore(CheckpointStore):
    """The controller's checkpoint in Ray's internal KV store: one value, replaced whole by each put."""

    def load(self) -> Optional[bytes]:
        return _kv_get(CHECKPOINT_KEY)

    def save(self, data: bytes) -> None:
        _kv_put(CHECKPOINT_KEY, data)

    def clear(self) -> None:
        _kv_del(CHECKPOINT_KEY)


def _read_record() -> Optional[dict]:
    data = _kv_get(RECORD_KEY)
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def controller_alive(actor_id: str) -> bool:
    """Whether the controller actor `actor_id` may still answer (blocking): it exists, running or being
    restarted by Ray, and is still this instance's. False once it is gone for good: shut down (its
    record is cleared first), out of restarts, or succeeded by a new instance's controller."""
    try:
        ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:  # no such actor (any longer)
        return False
    except Exception:  # noqa: BLE001 - Ray cannot tell now: keep trying
        return True
    try:
        record = _read_record()
    except Exception:  # noqa: BLE001
        return True
    return record is not None and record.get("actor_id") == actor_id


def current_controller_address(fallback: str) -> str:
    """Where the controller listens now (blocking): a restarted one may have had to take a new port."""
    try:
        record = _read_record()
    except Exception:  # noqa: BLE001 - Ray cannot tell now: try the last known address
        return fallback
    return (record or {}).get("address") or fallback


def _set_reconnect_hooks(client: Any, actor_id: str, address: str) -> None:
    client.controller_recoverable = functools.partial(controller_alive, actor_id)
    client.resolve_address = functools.partial(current_controller_address, address)


_ended = threading.Event()
_waits = threading.Condition()
_wait_calls = 0
EXIT_GRACE_S = 10.0


def _set_ended() -> None:
    with _waits:
        _ended.set()
        _waits.notify_all()


def _end_through_ray(code: int) -> None:
    """A worker's exit hook: `wait()` ends the actor through Ray (an intended exit, not a crash);
    should nobody be waiting, the process ends anyway after a grace period."""
    _set_ended()
    time.sleep(EXIT_GRACE_S)
    os._exit(code)


def _end_controller(code: int) -> None:
    """The controller's exit hook. A crash (code != 0) ends the process at once, so Ray restarts the
    actor; a shutdown ends the actor for good, through `wait()` or, with nobody waiting, `ray.kill`
    (a plain exit would look like a crash to Ray, which would start an empty controller again)."""
    if code != 0:
        os._exit(code)
    _set_ended()
    time.sleep(EXIT_GRACE_S)
    try:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        time.sleep(EXIT_GRACE_S)
    except Exception:  # noqa: BLE001
        pass
    os._exit(code)


def _thread_main(make_coro: Callable[[], Any], name: str, exit_hook: Callable[[int], None] = _end_through_ray) -> None:
    """Run one of shoal's process mains on its own loop; when it ends, this actor's process ends."""
    from shoal import common

    common.set_exit_hook(exit_hook)

    def target() -> None:
        from shoal.client import new_event_loop

        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        code = 0
        try:
            loop.run_until_complete(make_coro())
        except BaseException:  # noqa: BLE001 - print why, then die so the controller sees it
            traceback.print_exc()
            code = 1
        common.exit_process(code)

    threading.Thread(target=target, name=name, daemon=True).start()


def _set_node_env() -> None:
    from shoal import common

    os.environ["SHOAL_NODE_IP"] = ray.util.get_node_ip_address()
    os.environ["SHOAL_NODE_ID"] = common.LOCAL_NODE_ID = ray.get_runtime_context().get_node_id()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s -- %(message)s")


class _EndsThroughRay:
    @ray.method(max_task_retries=0)  # the controller's other calls are retried across its restarts
    def wait(self) -> Optional[str]:
        """Returns only by the actor's death, when shoal's main ends: its caller learns of the exit.

        A newer call releases the older ones (they return "superseded"): it is a restarted
        controller's, which adopts this actor, and the caller of an older one died. So the dead
        controllers' calls do not hold the actor's threads (`max_concurrency`) forever."""
        global _wait_calls
        with _waits:
            _wait_calls += 1
            mine = _wait_calls
            _waits.notify_all()
            _waits.wait_for(lambda: _ended.is_set() or _wait_calls != mine)
            if not _ended.is_set():
                return "superseded"
        ray.actor.exit_actor()
        return None


class ShoalWorker(_EndsThroughRay):
    """A replica or an HTTP proxy, running in this Ray actor's process."""

    def __init__(self, role: str, controller_address: str, secret: bytes, arg: str, controller_id: str = ""):
        auth.set_secret(secret)
        _set_node_env()
        from shoal import client as client_mod
        from shoal import common

        # Should the controller actor die, Ray restarts it: keep serving meanwhile and reconnect to
        # wherever it then listens; give up (exit) only once it is gone for good.
        client_mod.default_controller_recoverable = functools.partial(controller_alive, controller_id)
        client_mod.default_resolve_address = functools.partial(current_controller_address, controller_address)
        if role == "replica":
            from shoal.replica.server import run_replica

            _thread_main(lambda: run_replica(controller_address, arg), "shoal-replica")
        elif role == "metrics_exporter":
            from shoal.telemetry.node_exporter import run_node_exporter

            options = json.loads(arg)
            _thread_main(lambda: run_node_exporter(controller_address, common.LOCAL_NODE_ID, options["host"],
                                                   int(options["port"])), "shoal-metrics")
        else:
            from shoal.http.proxy import run_proxy

            _thread_main(lambda: run_proxy(controller_address, int(arg)), "shoal-proxy")


class RayReplicaProcess(ReplicaProcess):
    """A replica, proxy or metrics exporter actor, as the controller sees it: alive until its `wait`
    call fails.

    `handle` is the actor handle pickled (`describe`): a restarted controller unpickles it to adopt
    the actor, so worker actors need no names (a name costs a blocking lookup on every launch).
    """

    def __init__(self, actor: Any, node_id: str = "", placement_group: Any = None, handle: Optional[bytes] = None):
        self.actor = actor
        self.node_id = node_id
        self.placement_group = placement_group
        self._handle = handle
        self._code: Optional[int] = None
        self._output = ""
        self._stopping = False
        actor.wait.remote().future().add_done_callback(self._ended)

    def _ended(self, fut: Any) -> None:
        """Runs on a Ray thread: record only. A blocking Ray call here would deadlock Ray's I/O."""
        try:
            if fut.result() == "superseded":  # another controller adopted it (this one should be dead)
                return
            self._output = "the actor returned from wait()"
        except Exception as e:  # noqa: BLE001 - RayActorError, node death, scheduling failure
            self._output = str(e)[-2000:]
        self._code = 0 if self._stopping else 1

    def pickled_handle(self) -> bytes:
        if self._handle is None:
            self._handle = pickle.dumps(self.actor)
        return self._handle

    def _remove_placement_group(self) -> None:
        pg, self.placement_group = self.placement_group, None
        if pg is not None:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already removed, or Ray is shutting down
                pass

    def exit_code(self) -> Optional[int]:
        if self._code is not None:
            self._remove_placement_group()
        return self._code

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        self._stopping = True
        if self._code is None:
            try:
                ray.kill(self.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        # Placement groups are detached (a controller restart must not take them along): ours to remove.
        self._remove_placement_group()

    def recent_output(self) -> str:
        return self._output


def _draining_nodes() -> set[str]:
    """Nodes Ray is draining (its autoscaler removing them, a preemption notice): none of shoal's
    new work goes there, and their proxies leave."""
    try:
        from ray._private import state

        return set(state.state.get_draining_nodes())
    except Exception:  # noqa: BLE001 - Ray cannot say now: none taken for draining
        logger.debug("cannot read the draining nodes", exc_info=True)
        return set()


def _alive_nodes() -> tuple[list[dict], frozenset]:
    """Alive nodes that are not draining, the head first (it gets the first proxy); and the draining ones."""
    draining = _draining_nodes()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in draining]
    nodes.sort(key=lambda n: (HEAD_RESOURCE not in n.get("Resources", {}), n["NodeID"]))
    return nodes, frozenset(draining)


def _available_per_node() -> Optional[dict[str, dict[str, float]]]:
    """What Ray counts as free on each node now (its other work too); None when Ray cannot say."""
    try:
        from ray._private import state

        return state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - then shoal's own accounting alone decides
        logger.debug("cannot read the nodes' available resources", exc_info=True)
        return None


class RayRuntime(Runtime):
    """Places replicas and proxies as Ray actors; runs inside the controller actor."""

    name = "ray"

    # How long `adopt` waits for a worker actor to answer before taking it as alive anyway (its
    # `wait` call then tells): a dead actor's call fails at once.
    ADOPT_CHECK_S = 2.0

    def __init__(self, controller_address: str, secret: bytes, controller_id: str = ""):
        self.controller_address = controller_address
        self.secret = secret
        self.controller_id = controller_id  # the controller actor's id: workers check it is still there
        self._adopted_groups: set[str] = set()  # placement groups of adopted replicas (hex ids)
        self.worker = ray.remote(ShoalWorker)
        self.placement = Placement()  # shoal's reservations per node, and the node choice
        self._proxies: dict[int, RayReplicaProcess] = {}  # proxy index -> its actor (and node)
        self._alive: list[dict] = []
        self._draining: frozenset = frozenset()
        self._head: Optional[str] = None
        self._alive_at = -NODES_TTL_S
        self.exporters: dict[str, RayReplicaProcess] = {}  # node -> its metrics exporter actor
        self._exporter_retry_at: dict[str, float] = {}  # node -> when an exporter that exited is replaced
        self._views: list[NodeView] = []
        self._views_at = -NODES_TTL_S

    def _nodes(self, fresh: bool = False, max_age: float = NODES_TTL_S) -> list[dict]:
        """Alive nodes, asked of Ray when the last answer is older than `max_age` (or `fresh`): a
        pending replica is retried on every reconcile tick, and `ray.nodes()` is a blocking round trip
        to Ray's metadata service."""
        now = time.monotonic()
        if fresh or now - self._alive_at >= max_age:
            (self._alive, self._draining), self._alive_at = _alive_nodes(), now
        return self._alive

    def draining_nodes(self) -> frozenset:
        self._nodes(max_age=WATCH_NODES_TTL_S)
        return self._draining

    def head_node(self) -> Optional[str]:
        """The head node's id (the one with Ray's head resource; it never changes), None until seen."""
        if self._head is None:
            self._head = next((n["NodeID"] for n in self._nodes(max_age=WATCH_NODES_TTL_S)
                               if HEAD_RESOURCE in n.get("Resources", {})), None)
        return self._head

    def _node_views(self) -> list[NodeView]:
        """The alive nodes with what Ray counts as free on each, as fresh as `_nodes`."""
        alive = self._nodes()
        if self._views_at != self._alive_at:
            available = _available_per_node()
            self._views = [NodeView(n["NodeID"], dict(n.get("Resources", {})),
                                    None if available is None else available.get(n["NodeID"], {}))
                           for n in alive]
            self._views_at = self._alive_at
        return self._views

    def capacity(self) -> dict[str, float]:
        return {k: float(v) for k, v in ray.cluster_resources().items() if not k.startswith("node:")}

    def _proxy_nodes(self, http_options: dict, fresh: bool = False) -> list[str]:
        """The nodes that get an HTTP proxy, head first: as in Ray Serve, the head and (`EveryNode`)
        every alive node shoal placed replicas on. Not the others: a proxy actor, though it takes no
        CPU, keeps its node from counting as idle, and Ray's autoscaler removes only idle nodes."""
        alive = [n["NodeID"] for n in self._nodes(fresh, WATCH_NODES_TTL_S)]
        if not alive:
            return []
        if http_options.get("proxy_location") == "HeadOnly":
            return alive[:1]
        busy = self.placement.nodes()
        return [alive[0]] + [nid for nid in alive[1:] if nid in busy]

    def proxy_count(self, http_options: dict, fresh: bool = False) -> int:
        """One per node that needs one (`_proxy_nodes`): the controller follows this as it changes."""
        return max(1, len(self._proxy_nodes(http_options, fresh)))

    def surplus_proxies(self, http_options: dict) -> list[int]:
        """Proxies on nodes that no longer need one; the controller drains them, so they count here no more."""
        wanted = set(self._proxy_nodes(http_options))
        surplus = [i for i, p in self._proxies.items()
                   if p.exit_code() is None and not p._stopping and p.node_id not in wanted]
        for i in surplus:
            del self._proxies[i]
        return surplus

    def proxy_count_may_grow(self, http_options: dict) -> bool:
        return http_options.get("proxy_location") != "HeadOnly"

    def reserve(self, request: ResourceRequest) -> Union[Reservation, str]:
        """A node for one replica to prefer, or none: then it waits for Ray to add one (see
        `runtime/ray_placement.py`). Never a refusal: the actor is launched either way, so a replica
        that fits no node now is demand that Ray's autoscaler sees."""
        if request.placement_group_bundles:
            return Reservation(request, node_id="")  # Ray places the group, or keeps it pending
        views = self._node_views()
        return self.placement.choose(request, views, self._views_at)

    def release(self, reservation: Reservation) -> None:
        self.placement.release(reservation)

    def placed(self, reservation: Reservation, node_id: str) -> None:
        self.placement.placed(reservation, node_id)

    # --- surviving a controller restart ----------------------------------------------------------
    def checkpoint_store(self) -> CheckpointStore:
        return KVCheckpointStore()

    def describe(self, process: ReplicaProcess) -> Optional[dict]:
        if not isinstance(process, RayReplicaProcess):
            return None
        pg = process.placement_group
        proxy = next((i for i, p in self._proxies.items() if p is process), None)
        return {"actor": process.pickled_handle(), "node_id": process.node_id,
                "placement_group": pickle.dumps(pg) if pg is not None else None, "proxy": proxy}

    def adopt(self, description: dict) -> Optional[ReplicaProcess]:
        """The worker actor again, from its pickled handle, if it still runs (asked of it, briefly)."""
        try:
            actor = pickle.loads(description["actor"])
            pg = pickle.loads(description["placement_group"]) if description.get("placement_group") else None
        except Exception:  # noqa: BLE001 - e.g. written by another Ray version: replaced like a dead one
            logger.exception("cannot adopt a worker actor of the previous controller")
            return None
        process = RayReplicaProcess(actor, description.get("node_id", ""), pg, handle=description["actor"])
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=self.ADOPT_CHECK_S)
        except ray.exceptions.GetTimeoutError:
            pass  # busy, or its node is going: its `wait` call tells
        except Exception:  # noqa: BLE001 - RayActorError: it died while the controller was down
            process._remove_placement_group()
            return None
        if pg is not None:
            self._adopted_groups.add(pg.id.hex())
        if description.get("proxy") is not None:  # its node has a proxy: `launch_proxy` knows
            self._proxies[description["proxy"]] = process
        return process

    def remove_stray_placement_groups(self) -> None:
        """Remove shoal's placement groups that no adopted replica holds: those of replicas that died,
        that a controller made just before it died (not in its checkpoint), or an instance's that
        ended without shutting down. Called once the checkpoint was restored, before any launch."""
        try:
            table = ray.util.placement_group_table()
        except Exception:  # noqa: BLE001 - Ray busy: they stay (only a resource leak)
            logger.exception("cannot list placement groups")
            return
        for pg_id, info in table.items():
            if (str(info.get("name", "")).startswith(PLACEMENT_GROUP_PREFIX) and info.get("state") != "REMOVED"
                    and pg_id not in self._adopted_groups):
                try:
                    ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
                except Exception:  # noqa: BLE001 - removed meanwhile
                    pass

    def adopt_reservation(self, reservation: Reservation) -> None:
        self.placement.adopt(reservation)

    def replica_address(self, replica_id: ReplicaID) -> str:
        return "tcp://*:0"  # this node's address, any free port: the replica reports the real one

    def _options(self) -> dict:
        # Detached: a finished driver job must not take them along (the controller owns their lifetime).
        # Unnamed: a name costs a blocking lookup in Ray on every launch.
        return dict(namespace=NAMESPACE, lifetime="detached", max_restarts=0, max_concurrency=2)

    def launch(self, replica_id: ReplicaID, reservation: Reservation,
               logs_dir: Optional[str] = None) -> ReplicaProcess:
        # (`logs_dir` is not honoured here yet: Ray places its workers' log files.)
        r = reservation.request
        opts = self._options()
        opts.update(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.resources))
        if r.memory:
            opts["memory"] = r.memory
        pg = None
        if r.max_replicas_per_node and not r.placement_group_bundles:
            opts["resources"][IMPLICIT_RESOURCE_PREFIX + r.group] = 1.0 / r.max_replicas_per_node
        if r.placement_group_bundles:
            pg = ray.util.placement_group([dict(b) for b in r.placement_group_bundles],
                                          strategy=r.placement_group_strategy or "PACK", lifetime="detached",
                                          name=PLACEMENT_GROUP_PREFIX + replica_id.unique_id)
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
        elif reservation.node_id and not r.as_dict():
            # Nothing to wait for: pinned (Ray places an actor without resources anywhere, soft
            # preference or not, which would undo the spread).
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(reservation.node_id, soft=False)
        elif reservation.node_id:
            # A preference: should the node have filled up meanwhile (other Ray work, a race), Ray
            # starts the replica elsewhere, or keeps it pending until a node has room.
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(reservation.node_id, soft=True,
                                                                         _spill_on_unavailable=True)
        else:  # no node has room: pending in Ray, it is demand its autoscaler adds a node for
            opts["scheduling_strategy"] = "SPREAD"
        actor = self.worker.options(**opts).remote("replica", self.controller_address, self.secret,
                                                  replica_id.unique_id, self.controller_id)
        return RayReplicaProcess(actor, reservation.node_id, pg)

    # --- per-node metrics endpoints -------------------------------------------------------------
    exports_metrics_per_node = True

    def ensure_node_exporters(self, options: dict) -> None:
        """One exporter actor per node that runs shoal's processes: the head and every node with
        replicas, as for proxies (`_proxy_nodes`); not the others, since an actor, though it takes no
        CPU, keeps its node from counting as idle to Ray's autoscaler. Named after the instance (the
        controller actor's id, which a Ray restart keeps) and the node: a restarted controller gets
        the running ones back by name (`get_if_exists`) instead of starting others."""
        wanted = self._proxy_nodes({"proxy_location": "EveryNode"})
        for gone in set(self.exporters) - set(wanted):  # its node left, or has no replicas any more
            self.exporters.pop(gone).kill()
        for node_id in wanted:
            have = self.exporters.get(node_id)
            if have is not None and have.exit_code() is None:
                continue
            if have is not None:
                if time.monotonic() < self._exporter_retry_at.get(node_id, 0.0):
                    continue
                self._exporter_retry_at[node_id] = time.monotonic() + EXPORTER_RETRY_S
                logger.warning("the metrics exporter on node %s exited (%s); starting another",
                               node_id, have.recent_output())
            opts = self._options()
            opts.update(name=f"shoal-metrics-{self.controller_id}-{node_id}", get_if_exists=True, num_cpus=0,
                        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
            actor = self.worker.options(**opts).remote("metrics_exporter", self.controller_address, self.secret,
                                                      json.dumps(options), self.controller_id)
            self.exporters[node_id] = RayReplicaProcess(actor, node_id)

    def stop_node_exporters(self) -> None:
        for process in self.exporters.values():
            process.kill()
        self.exporters.clear()

    def launch_proxy(self, index: int) -> ReplicaProcess:
        """Proxy `index` goes to the first node that needs a proxy (head first) and has no running one:
        a node that starts replicas gets the next one, a proxy that died is restarted where it ran."""
        nodes = [n["NodeID"] for n in self._nodes()]
        served = {p.node_id for i, p in self._proxies.items() if i != index and p.exit_code() is None
                  and not p._stopping}
        wanted = self._proxy_nodes({"proxy_location": "EveryNode"})
        free = [nid for nid in wanted if nid not in served] or [nid for nid in nodes if nid not in served]
        node_id = free[0] if free else nodes[index % len(nodes)]
        opts = self._options()
        opts.update(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        actor = self.worker.options(**opts).remote("proxy", self.controller_address, self.secret, str(index),
                                                  self.controller_id)
        process = self._proxies[index] = RayReplicaProcess(actor, node_id)
        return process


class ShoalController(_EndsThroughRay):
    """The controller actor: detached, on the head node, so applications outlive the driver.

    Ray restarts it should its process die (`max_restarts=-1`): `__init__` runs again in a new
    process, finds its own record in the KV store (same actor id) and recovers: the same secret
    (replicas, proxies and drivers hold it), its previous port if that is free, and the checkpoint's
    applications, with the worker actors that still run adopted.
    """

    def __init__(self) -> None:
        _set_node_env()
        logging.getLogger("shoal.controller").setLevel(logging.INFO)
        actor_id = ray.get_runtime_context().get_actor_id()
        record = _read_record()
        recovering = record is not None and record.get("actor_id") == actor_id
        if recovering:
            secret = bytes.fromhex(record["secret"])  # type: ignore[index]
        else:  # a new instance: what an earlier one left in the KV store (it never shut down) is not ours
            secret = auth.new_secret()
            KVCheckpointStore().clear()
            record = {"actor_id": actor_id, "secret": secret.hex(), "address": ""}
            _kv_put(RECORD_KEY, json.dumps(record).encode())
        auth.set_secret(secret)
        self._ready = threading.Event()
        self._info: dict = {}
        _thread_main(lambda: self._main(secret, record, recovering), "shoal-controller", _end_controller)

    async def _main(self, secret: bytes, record: dict, recovering: bool) -> None:
        from shoal.controller import checkpoint
        from shoal.controller.controller import Controller
        from shoal.transport.connection import serve_tcp

        holder: dict = {}
        host = os.environ["SHOAL_NODE_IP"]
        server = None
        if record.get("address"):  # a restart: where replicas, proxies and drivers look first
            try:
                server = await serve_tcp(host, parse_tcp_address(record["address"])[1], lambda: holder["controller"],
                                         name="controller")
            except OSError as e:
                logger.warning("the controller's previous port is taken (%s); listening on a new one", e)
        if server is None:
            server = await serve_tcp(host, 0, lambda: holder["controller"], name="controller")
        runtime = RayRuntime(server.address, secret, record["actor_id"])
        # No await from here until the controller is whole: connections are admitted on this loop.
        controller = holder["controller"] = Controller(runtime)
        snap = checkpoint.load(controller.checkpoint_store) if recovering else None  # type: ignore[arg-type]
        if snap is not None:
            try:
                controller.restore(snap)
            except Exception:  # noqa: BLE001 - crashing would only make Ray restart it into the same failure
                logger.exception("recovering from the checkpoint failed; starting with no applications")
                runtime = RayRuntime(server.address, secret, record["actor_id"])
                controller = holder["controller"] = Controller(runtime)
            else:
                await controller.metrics.resume()  # the metrics endpoint where it was
        runtime.remove_stray_placement_groups()
        _kv_put(RECORD_KEY, json.dumps(dict(record, address=server.address)).encode())
        runner = asyncio.get_running_loop().create_task(controller.run())
        self._info = {"address": server.address, "secret": secret, "actor_id": record["actor_id"], "pid": os.getpid()}
        self._ready.set()
        await controller.done.wait()
        _kv_del(RECORD_KEY)  # shut down: nothing to restart (processes still reconnecting give up)
        await asyncio.sleep(0.05)  # let the shutdown reply reach the driver
        server.close()
        runner.cancel()

    def info(self) -> dict:
        """Where the controller listens, and the secret that lets a driver in (Ray members only); its
        actor id (workers and drivers check that it is still there) and process id."""
        if not self._ready.wait(60):
            raise RuntimeError("the shoal controller did not start")
        return self._info


def connect_driver(address: Optional[str], http_options: Optional[dict],
                   metrics_options: Optional[dict] = None) -> Any:
    """Join (or start) the shoal instance on a Ray cluster; returns the driver's ServeClient.

    Should the controller be restarting, this waits for it (at most START_TIMEOUT_S)."""
    from shoal import common
    from shoal.client import ServeClient, _IoThread

    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    cls = ray.remote(ShoalController)
    # Ray restarts the controller should its process die, and retries calls made meanwhile on the new
    # one (max_task_retries): `info()` then answers once it has recovered.
    actor = cls.options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                        num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4,
                        resources={HEAD_RESOURCE: 0.001}).remote()
    common.LOCAL_NODE_ID = ray.get_runtime_context().get_node_id()  # the driver's routers prefer this node
    deadline = time.monotonic() + START_TIMEOUT_S
    io = _IoThread()
    try:
        while True:
            try:
                info = ray.get(actor.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise RayServeException(
                    f"The shoal controller on the Ray cluster did not answer within {START_TIMEOUT_S:g} s: it is "
                    "starting, or restarting after a failure, and has not come up yet. Try again shortly.") from None
            except ray.exceptions.RayError as e:
                raise RayServeException(f"The shoal controller on the Ray cluster is not available: {e}") from None
            auth.set_secret(info["secret"])
            client = ServeClient(io.loop, info["address"], io_thread=io)
            client.runtime = "ray"
            client.after_shutdown = lambda timeout: _wait_gone(actor, timeout)
            _set_reconnect_hooks(client, info["actor_id"], info["address"])
            try:
                asyncio.run_coroutine_threadsafe(
                    client.connect("driver", owner=False, http_options=http_options,
                                   metrics_options=metrics_options), io.loop).result(60)
                return client
            except (OSError, ConnectionError) as e:  # it died just now: Ray restarts it, ask again
                if client.conn is not None:
                    io.loop.call_soon_threadsafe(client.conn.close)
                if time.monotonic() > deadline:
                    raise RayServeException(f"Cannot reach the shoal controller on the Ray cluster: {e}") from None
                time.sleep(0.2)
    except BaseException:
        io.stop()
        raise


def _wait_gone(actor: Any, timeout: float) -> None:
    """After `shutdown`, wait until the controller actor is gone, so a new start gets a new one."""
    try:
        ray.get(actor.wait.remote(), timeout=min(timeout, EXIT_GRACE_S))
    except Exception:  # noqa: BLE001 - it exited as asked, or timed out: the polling below decides
        pass
    deadline = time.monotonic() + min(timeout, 15)
    while time.monotonic() < deadline:
        try:
            ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.05)
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001
        pass
