"""One node's metrics endpoint on the Ray runtime, as Ray exports metrics per node.

Runs in a small actor on every node (`runtime/ray.py` starts one per node, named after the
instance and the node). It listens on the configured host and `metrics_export_port` on its node
and, on each scrape, asks the controller for the slice of the instance's metrics that the processes
on this node pushed (`metrics_text(node_id)`): pushes stay as they are (each process to the
controller, about once a second), nothing is added to any request path.

It tells the controller where it listens in its hello, so `metrics_export_urls()` lists every node.
Should the controller die, it keeps listening (a scrape meanwhile answers 503) and reconnects to
the restarted one; it exits once the controller is gone for good.
"""

from __future__ import annotations

import asyncio
import logging
import os

from shoal.telemetry.endpoint import MetricsEndpoint, Unavailable, endpoint_url

logger = logging.getLogger("shoal.metrics")

# A scrape waits this long for the controller (e.g. while Ray restarts it), then answers 503.
SCRAPE_WAIT_S = 10.0


async def run_node_exporter(controller_address: str, node_id: str, host: str, port: int) -> None:
    from shoal.client import ServeClient
    from shoal.common import exit_process

    loop = asyncio.get_running_loop()
    client = ServeClient(loop, controller_address)
    client.controller_wait_s = SCRAPE_WAIT_S

    async def render() -> str:
        try:
            return await client.call("metrics_text", node_id)
        except Exception as e:  # noqa: BLE001 - the controller is restarting (or gone)
            raise Unavailable(f"the shoal controller is not reachable now ({e!r}); try again shortly") from None

    endpoint = MetricsEndpoint(render)
    actual = await endpoint.listen(host, port)
    if actual is None:
        exit_process(1)
        return
    url = endpoint_url(host, actual, os.environ.get("SHOAL_NODE_IP", ""))
    done = asyncio.Event()
    client.on_controller_lost = done.set
    await client.connect("metrics_exporter", url=url)
    logger.info("Prometheus metrics of node %s at %s", node_id, url)
    await done.wait()
    endpoint.close()
