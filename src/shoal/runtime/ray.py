"""The Ray runtime: Ray starts and places shoal's processes on a cluster; shoal does the rest.

Ray's part is only placement and lifetime: the controller, every replica and every HTTP proxy is a
(detached) Ray actor, placed by its resources. Inside each actor the same code as on one machine
runs on its own event loop thread: the controller's reconcile loop, `run_replica`, `run_proxy`.
Requests and control calls never go through Ray; they use shoal's framed protocol over TCP, each
connection authenticated with the instance secret (`transport/auth.py`) before a frame is read.

Imported only when the Ray runtime is chosen: the embedded path never imports `ray`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional, Union

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from shoal.common import ReplicaID
from shoal.runtime.base import RESOURCE_EPS, ReplicaProcess, Reservation, ResourceRequest, Runtime
from shoal.transport import auth

NAMESPACE = "shoal"
CONTROLLER_NAME = "SHOAL_CONTROLLER"
HEAD_RESOURCE = "node:__internal_head__"
NODES_TTL_S = 0.5


_ended = threading.Event()
EXIT_GRACE_S = 10.0


def _end_through_ray(code: int) -> None:
    """This actor's exit hook: `wait()` ends the actor through Ray (an intended exit, not a crash);
    should nobody be waiting, the process ends anyway after a grace period."""
    _ended.set()
    time.sleep(EXIT_GRACE_S)
    os._exit(code)


def _thread_main(make_coro: Callable[[], Any], name: str) -> None:
    """Run one of shoal's process mains on its own loop; when it ends, this actor's process ends."""
    from shoal import common

    common.set_exit_hook(_end_through_ray)

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
    def wait(self) -> None:
        """Returns only by the actor's death, when shoal's main ends: its caller learns of the exit."""
        _ended.wait()
        ray.actor.exit_actor()


class ShoalWorker(_EndsThroughRay):
    """A replica or an HTTP proxy, running in this Ray actor's process."""

    def __init__(self, role: str, controller_address: str, secret: bytes, arg: str):
        auth.set_secret(secret)
        _set_node_env()
        if role == "replica":
            from shoal.replica.server import run_replica

            _thread_main(lambda: run_replica(controller_address, arg), "shoal-replica")
        else:
            from shoal.http.proxy import run_proxy

            _thread_main(lambda: run_proxy(controller_address, int(arg)), "shoal-proxy")


class RayReplicaProcess(ReplicaProcess):
    """A replica or proxy actor, as the controller sees it: alive until its `wait` call fails."""

    def __init__(self, actor: Any, node_id: str = "", placement_group: Any = None):
        self.actor = actor
        self.node_id = node_id
        self.placement_group = placement_group
        self._code: Optional[int] = None
        self._output = ""
        self._stopping = False
        actor.wait.remote().future().add_done_callback(self._ended)

    def _ended(self, fut: Any) -> None:
        """Runs on a Ray thread: record only. A blocking Ray call here would deadlock Ray's I/O."""
        try:
            fut.result()
            self._output = "the actor returned from wait()"
        except Exception as e:  # noqa: BLE001 - RayActorError, node death, scheduling failure
            self._output = str(e)[-2000:]
        self._code = 0 if self._stopping else 1

    def exit_code(self) -> Optional[int]:
        if self._code is not None and self.placement_group is not None:
            pg, self.placement_group = self.placement_group, None
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already removed, or Ray is shutting down
                pass
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

    def recent_output(self) -> str:
        return self._output


def _alive_nodes() -> list[dict]:
    """Alive nodes, the head first: proxy i goes to node i."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: (HEAD_RESOURCE not in n.get("Resources", {}), n["NodeID"]))


def _fits(have: dict, wanted: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + RESOURCE_EPS >= v for k, v in wanted.items())


class RayRuntime(Runtime):
    """Places replicas and proxies as Ray actors; runs inside the controller actor."""

    name = "ray"

    def __init__(self, controller_address: str, secret: bytes):
        self.controller_address = controller_address
        self.secret = secret
        self.worker = ray.remote(ShoalWorker)
        self.per_node: dict[tuple[str, str], int] = {}  # (deployment, node) -> replicas placed there
        self.reserved: dict[int, tuple[str, str]] = {}  # id(reservation) -> its key in per_node
        self.used: dict[str, dict[str, float]] = {}  # node -> resources shoal's replicas reserved there
        self._alive: list[dict] = []
        self._alive_at = -NODES_TTL_S

    def _nodes(self) -> list[dict]:
        """Alive nodes, asked of Ray at most every NODES_TTL_S: a pending replica is retried on every
        reconcile tick, and `ray.nodes()` is a blocking round trip to Ray's metadata service."""
        now = time.monotonic()
        if now - self._alive_at >= NODES_TTL_S:
            self._alive, self._alive_at = _alive_nodes(), now
        return self._alive

    def capacity(self) -> dict[str, float]:
        return {k: float(v) for k, v in ray.cluster_resources().items() if not k.startswith("node:")}

    def proxy_count(self, http_options: dict) -> int:
        if http_options.get("proxy_location") == "HeadOnly":
            return 1
        return max(1, len(self._nodes()))

    def reserve(self, request: ResourceRequest) -> Union[Reservation, str]:
        """Pick a node for one replica: one with room, the fewest of this deployment's replicas first.

        Room is each node's resources less what shoal's replicas there reserved (the embedded
        runtime's accounting, per node); the actor is then pinned to that node. A request that no
        node can hold now stays pending with a reason, as on one machine.
        """
        wanted = request.as_dict()
        if request.placement_group_bundles:
            return Reservation(request, node_id="")  # Ray places the group, or keeps it pending
        alive = self._nodes()
        parts = ", ".join(f"{k}: {v:g}" for k, v in wanted.items())
        able = [n for n in alive if _fits(n.get("Resources", {}), wanted)]
        if not able:
            return f"needs {parts}, and no node of the Ray cluster has that much"
        free = {n["NodeID"]: {k: v - self.used.get(n["NodeID"], {}).get(k, 0.0)
                              for k, v in n.get("Resources", {}).items()} for n in able}
        nodes = [nid for nid, have in free.items() if _fits(have, wanted)]
        if not nodes:
            return f"needs {parts}, and every node that could hold it is full"
        counts = {nid: self.per_node.get((request.group, nid), 0) for nid in nodes}
        if request.max_replicas_per_node:
            nodes = [nid for nid in nodes if counts[nid] < request.max_replicas_per_node]
            if not nodes:
                return (f"may run at most {request.max_replicas_per_node} replica(s) per node, and every "
                        f"node that fits has that many")
        totals: dict[str, int] = {}
        for (_, nid), c in self.per_node.items():
            totals[nid] = totals.get(nid, 0) + c
        node_id = min(nodes, key=lambda nid: (counts[nid], totals.get(nid, 0), random.random()))
        self.per_node[(request.group, node_id)] = counts[node_id] + 1
        used = self.used.setdefault(node_id, {})
        for k, v in wanted.items():
            used[k] = used.get(k, 0.0) + v
        reservation = Reservation(request, node_id=node_id)
        self.reserved[id(reservation)] = (request.group, node_id)
        return reservation

    def release(self, reservation: Reservation) -> None:
        key = self.reserved.pop(id(reservation), None)
        if key is None:
            return
        self.per_node[key] = max(0, self.per_node.get(key, 0) - 1)
        used = self.used.get(key[1], {})
        for k, v in reservation.request.as_dict().items():
            used[k] = used.get(k, 0.0) - v

    def replica_address(self, replica_id: ReplicaID) -> str:
        return "tcp://*:0"  # this node's address, any free port: the replica reports the real one

    def _options(self) -> dict:
        # Detached: a finished driver job must not take them along (the controller owns their lifetime).
        # Unnamed: a name costs a blocking lookup in Ray on every launch.
        return dict(namespace=NAMESPACE, lifetime="detached", max_restarts=0, max_concurrency=2)

    def launch(self, replica_id: ReplicaID, reservation: Reservation) -> ReplicaProcess:
        r = reservation.request
        opts = self._options()
        opts.update(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.resources))
        if r.memory:
            opts["memory"] = r.memory
        pg = None
        if r.placement_group_bundles:
            pg = ray.util.placement_group([dict(b) for b in r.placement_group_bundles],
                                          strategy=r.placement_group_strategy or "PACK")
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
        else:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(reservation.node_id, soft=False)
        actor = self.worker.options(**opts).remote("replica", self.controller_address, self.secret,
                                                  replica_id.unique_id)
        return RayReplicaProcess(actor, reservation.node_id, pg)

    def launch_proxy(self, index: int) -> ReplicaProcess:
        nodes = self._nodes()
        node_id = nodes[index % len(nodes)]["NodeID"]
        opts = self._options()
        opts.update(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        actor = self.worker.options(**opts).remote("proxy", self.controller_address, self.secret, str(index))
        return RayReplicaProcess(actor, node_id)


class ShoalController(_EndsThroughRay):
    """The controller actor: detached, on the head node, so applications outlive the driver."""

    def __init__(self) -> None:
        secret = auth.new_secret()
        auth.set_secret(secret)
        _set_node_env()
        logging.getLogger("shoal.controller").setLevel(logging.INFO)
        self._ready = threading.Event()
        self._info: dict = {}
        _thread_main(lambda: self._main(secret), "shoal-controller")

    async def _main(self, secret: bytes) -> None:
        from shoal.controller.controller import Controller
        from shoal.transport.connection import serve_tcp

        holder: dict = {}
        server = await serve_tcp(os.environ["SHOAL_NODE_IP"], 0, lambda: holder["controller"], name="controller")
        runtime = RayRuntime(server.address, secret)
        controller = holder["controller"] = Controller(runtime)
        runner = asyncio.get_running_loop().create_task(controller.run())
        self._info = {"address": server.address, "secret": secret}
        self._ready.set()
        await controller.done.wait()
        await asyncio.sleep(0.05)  # let the shutdown reply reach the driver
        server.close()
        runner.cancel()

    def info(self) -> dict:
        """Where the controller listens, and the secret that lets a driver in (Ray members only)."""
        if not self._ready.wait(60):
            raise RuntimeError("the shoal controller did not start")
        return self._info


def connect_driver(address: Optional[str], http_options: Optional[dict]) -> Any:
    """Join (or start) the shoal instance on a Ray cluster; returns the driver's ServeClient."""
    from shoal.client import ServeClient, _IoThread

    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
    cls = ray.remote(ShoalController)
    actor = cls.options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                        num_cpus=0, max_restarts=0, max_concurrency=4, resources={HEAD_RESOURCE: 0.001}).remote()
    info = ray.get(actor.info.remote(), timeout=120)
    from shoal import common

    common.LOCAL_NODE_ID = ray.get_runtime_context().get_node_id()  # the driver's routers prefer this node
    auth.set_secret(info["secret"])
    io = _IoThread()
    client = ServeClient(io.loop, info["address"], io_thread=io)
    client.runtime = "ray"
    client.after_shutdown = lambda timeout: _wait_gone(actor, timeout)
    try:
        asyncio.run_coroutine_threadsafe(
            client.connect("driver", owner=False, http_options=http_options), io.loop).result(60)
    except BaseException:
        io.stop()
        raise
    return client


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
