"""The Ray runtime on a real three-node Ray cluster: placement, resources, apps unchanged, security, node loss."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from shoal import serve
from shoal.api import get_http_url
from shoal.common import DeploymentID
from shoal.exceptions import ReplicaDiedError
from shoal.transport.framing import Kind, pack

from conftest import wait_for
from ray_cluster import ray_cluster_fixture

pytestmark = pytest.mark.slow
ray_cluster = ray_cluster_fixture()


@pytest.fixture(scope="module")
def serve_instance(ray_cluster):
    serve.start(runtime="ray", http_options={"port": 0})
    yield


@serve.deployment
class WhereAmI:
    def __call__(self, *args):
        return os.environ["SHOAL_NODE_ID"]

    async def sleep(self, s: float, started_file: str = ""):
        import asyncio

        if started_file:
            open(started_file, "w").close()
        await asyncio.sleep(s)
        return os.environ["SHOAL_NODE_ID"]


def _nodes_seen(handle, expected: set, deployment: str = "WhereAmI", app: str = "default") -> None:
    """The deployment's replicas run on exactly the nodes in `expected` (as each replica reports its
    node to the controller, and the driver's router gets the set), and calls reach them."""
    from shoal import client as client_mod

    def nodes():
        targets = client_mod.get_global_client()._targets.get(DeploymentID(deployment, app))
        return targets and {r.node_id for r in targets.replicas}

    # A call answers from one of them (ties go to the caller's node, so not every node need answer),
    # and subscribes this process to the deployment's replica set.
    assert handle.remote().result() in expected
    wait_for(lambda: nodes() == expected, what=f"replicas on exactly {expected}")


def test_replicas_spread_over_the_nodes(serve_app, ray_cluster):
    h = serve.run(WhereAmI.options(num_replicas=3, max_ongoing_requests=2).bind())
    everywhere = {ray_cluster.node_id(n) for n in ("head", "w1", "w2")}
    _nodes_seen(h, everywhere)
    # More calls at once than two replicas take: every node serves some of them.
    assert {r.result() for r in [h.sleep.remote(0.3) for _ in range(12)]} == everywhere


def test_replica_ranks_count_nodes_and_replicas_per_node(serve_app, ray_cluster):
    @serve.deployment(num_replicas=4, max_ongoing_requests=1)
    class RankedWhere:
        async def __call__(self):
            import asyncio

            await asyncio.sleep(0.2)  # with one request per replica, concurrent calls reach every replica
            r = serve.get_replica_context().rank
            return os.environ["SHOAL_NODE_ID"], r.rank, r.node_rank, r.local_rank

    h = serve.run(RankedWhere.bind())
    answers = wait_for(lambda: (lambda s: s if len(s) == 4 else None)(
        {r.result() for r in [h.remote() for _ in range(16)]}), what="4 replicas answering")
    assert sorted(a[1] for a in answers) == [0, 1, 2, 3]
    by_node: dict = {}
    for node, _, node_rank, local_rank in answers:
        by_node.setdefault(node, []).append((node_rank, local_rank))
    assert len(by_node) == 3  # spread over the three nodes
    assert sorted({ranks[0][0] for ranks in by_node.values()}) == [0, 1, 2]  # one node rank per node
    for ranks in by_node.values():
        assert len({nr for nr, _ in ranks}) == 1
        assert sorted(lr for _, lr in ranks) == list(range(len(ranks)))


def test_custom_resource_places_replicas_only_on_the_node_that_has_it(serve_app, ray_cluster):
    h = serve.run(WhereAmI.options(num_replicas=2, ray_actor_options={"resources": {"w2": 0.1}}).bind())
    _nodes_seen(h, {ray_cluster.node_id("w2")})


def test_max_replicas_per_node(serve_app, ray_cluster):
    h = serve.run(WhereAmI.options(num_replicas=3, max_replicas_per_node=1,
                                   ray_actor_options={"num_cpus": 0.5}).bind())
    _nodes_seen(h, {ray_cluster.node_id(n) for n in ("head", "w1", "w2")})


def test_placement_group_bundles_place_the_replica_with_its_group(serve_app, ray_cluster):
    # STRICT_PACK puts both bundles on one node; only w2 has the second one's resource.
    h = serve.run(WhereAmI.options(placement_group_bundles=[{"CPU": 0.5}, {"w2": 0.1}],
                                   placement_group_strategy="STRICT_PACK").bind())
    _nodes_seen(h, {ray_cluster.node_id("w2")})


def test_request_no_node_can_hold_stays_pending_with_a_reason(serve_app):
    from shoal import client as client_mod
    from shoal.api import build_app_spec

    spec = build_app_spec(WhereAmI.options(ray_actor_options={"resources": {"gpu_island": 1}}).bind(),
                          "pending", "/pending")
    client_mod.get_global_client().call_sync("deploy_app", spec)

    def message():
        app = serve.status().applications.get("pending")
        return app and app.deployments["WhereAmI"].message

    text = wait_for(message, what="a pending reason")
    # Launched all the same (an autoscaling cluster would add a node for it); this one cannot grow.
    assert "waiting for the cluster to add a node with gpu_island: 1" in text
    assert "no node of the Ray cluster has that much" in text


def test_composition_example_runs_unchanged(serve_app):
    from examples.composition import app

    assert "Fish eat plankton" in serve.run(app).remote("what do fish eat?").result()
    r = httpx.get(get_http_url() + "/", params={"query": "what do fish eat?"})
    assert r.status_code == 200 and "Fish eat plankton" in r.text


def test_http_app_on_every_node_proxy(serve_app, ray_cluster):
    @serve.deployment(num_replicas=3)  # spread: a replica, so a proxy, on each node
    class Hello:
        async def __call__(self, request):
            return {"hello": request.query_params["name"], "node": os.environ["SHOAL_NODE_ID"]}

    serve.run(Hello.bind(), route_prefix="/hello")
    proxies = serve.status().proxies
    assert len(proxies) == 3 and all(s == "HEALTHY" for s in proxies.values())
    assert {k.split(":")[0] for k in proxies} == {ray_cluster.node_id(n) for n in ("head", "w1", "w2")}
    with httpx.Client() as c:  # the proxies share the port: several connections reach several of them
        for _ in range(10):
            r = c.get(get_http_url() + "/hello", params={"name": "fish"}, headers={"connection": "close"})
            assert r.status_code == 200 and r.json()["hello"] == "fish"


def _replica_address(deployment: str, app: str = "default") -> str:
    from shoal import client as client_mod

    targets = client_mod.get_global_client()._targets[DeploymentID(deployment, app)]
    return targets.replicas[0].address


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _closed_by_peer(s: socket.socket) -> bool:
    """True when the peer closed: EOF, or a reset (it closed with our unread bytes in its buffer)."""
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


def test_replica_port_refuses_peers_without_the_secret(serve_app, tmp_path):
    h = serve.run(WhereAmI.bind())
    h.remote().result()  # the router knows the replica's address now
    address = _replica_address("WhereAmI")
    assert address.startswith("tcp://")
    host, port = address[len("tcp://"):].rsplit(":", 1)
    marker = tmp_path / "ran"
    body = pickle.dumps(("__call__", False, "", "rid", (_RunsCode(str(marker)),), {}))
    frame = pack(Kind.REQUEST, 1, body)

    # A peer that skips the handshake and sends a request at once: its bytes are a wrong proof.
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(frame * 4)
        assert s.recv(64).startswith(b"SHOAL1")  # the challenge; nothing else comes back
        assert _closed_by_peer(s)  # then the replica closes the connection
    # A peer that answers the challenge with a guessed secret.
    from shoal.transport import auth

    with socket.create_connection((host, int(port)), timeout=10) as s:
        hello = s.recv(64)
        server_nonce = hello[len(auth.MAGIC):]
        client_nonce = os.urandom(auth.NONCE_SIZE)
        s.sendall(client_nonce + auth._mac(b"guess" * 6, b"C", server_nonce, client_nonce) + frame)
        assert _closed_by_peer(s)
    time.sleep(0.5)
    assert not marker.exists()
    # The same frame after a proper handshake would have run (the test can fail): the replica still serves.
    assert h.remote().result()


def _driver(code: str, **env: str) -> str:
    """Run `code` as a separate driver process (no ray.init of its own); its stdout."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, **env))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_detached_app_outlives_the_driver_that_deployed_it(serve_app, ray_cluster):
    # Deployed by a driver that chooses the runtime by environment only, and exits.
    out = _driver("""
        from shoal import serve

        @serve.deployment
        class Detached:
            def __call__(self, request):
                return "still here"

        serve.run(Detached.bind(), name="detached", route_prefix="/detached")
        print("deployed", flush=True)
    """, SHOAL_RUNTIME="ray", SHOAL_RAY_ADDRESS=ray_cluster.cluster.address)
    assert "deployed" in out
    assert serve.status().applications["detached"].status == "RUNNING"
    r = httpx.get(get_http_url() + "/detached")
    assert r.status_code == 200 and r.text == "still here"
    # A third driver (runtime and address as arguments) joins, reads the status and deletes the app.
    out = _driver(f"""
        from shoal import serve

        serve.start(runtime="ray", address={ray_cluster.cluster.address!r})
        print(serve.status().applications["detached"].status.value, flush=True)
        serve.delete("detached")
    """, SHOAL_RUNTIME="embedded")
    assert out.strip().splitlines()[-1] == "RUNNING"
    assert "detached" not in serve.status().applications


def test_one_process_runs_one_runtime(serve_instance):
    with pytest.raises(serve.RayServeException, match="already runs on the ray runtime"):
        serve.start(runtime="embedded")


# Last: it takes a node away from the module's cluster.
def test_node_loss_replaces_replicas_and_fails_only_requests_in_flight_there(serve_app, ray_cluster, tmp_path):
    dead = ray_cluster.node_id("w1")
    h = serve.run(WhereAmI.options(num_replicas=3, max_ongoing_requests=100).bind())
    _nodes_seen(h, {ray_cluster.node_id(n) for n in ("head", "w1", "w2")})
    pinned = serve.run(WhereAmI.options(name="Pinned", ray_actor_options={"resources": {"w1": 0.1}}).bind(),
                       name="pinned", route_prefix=None)
    started = tmp_path / "started"
    in_flight = pinned.sleep.remote(60, str(started))
    wait_for(started.exists, what="the request to run on w1")
    ray_cluster.cluster.remove_node(ray_cluster.nodes["w1"])

    with pytest.raises(ReplicaDiedError, match="died while handling request"):
        in_flight.result(timeout_s=60)

    def lost_replica_dropped():
        d = serve.status().applications["default"].deployments["WhereAmI"]
        return d.replica_states.get("RUNNING", 0) < 3 or d.status != "HEALTHY"

    # Once the controller has seen the lost node's replica go (and told the routers), calls keep
    # succeeding while it is replaced on the other nodes. (A call sent to it before that was in
    # flight there: it fails like the one above, and is never re-sent.)
    wait_for(lost_replica_dropped, timeout=60, what="the lost replica to leave the replica set")
    responses = [h.remote() for _ in range(30)]
    assert all(r.result(timeout_s=60) != dead for r in responses)

    def replaced():
        d = serve.status().applications["default"].deployments["WhereAmI"]
        return d.status == "HEALTHY" and d.replica_states.get("RUNNING") == 3

    wait_for(replaced, timeout=60, what="three running replicas on the two nodes left")
    _nodes_seen(h, {ray_cluster.node_id("head"), ray_cluster.node_id("w2")})
    r = httpx.get(get_http_url() + "/")
    assert r.status_code == 200
