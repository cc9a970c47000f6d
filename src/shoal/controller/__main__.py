"""Entry point of the controller process: `python -m shoal.controller --session-dir DIR`.

With `--instance-dir` it is a detached instance (`shoal start`): no driver owns it, it starts the
HTTP proxies with `--http-options` at once, serves the admin API on loopback, records itself in
`instance.json` and runs until asked to shut down (admin API, SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Optional

from shoal import keeper
from shoal.client import CONTROLLER_SOCKET, new_event_loop
from shoal.controller import checkpoint
from shoal.controller.controller import Controller
from shoal.controller.memory_monitor import MemoryMonitor
from shoal.runtime.embedded import EmbeddedRuntime
from shoal.transport.connection import serve_unix


async def _main(session_dir: str, logs_dir: str, args: argparse.Namespace) -> None:
    runtime = EmbeddedRuntime(session_dir, logs_dir)
    controller = Controller(runtime)
    if args.recover:  # a restart: become the controller that died, before anyone can connect
        snap = checkpoint.load(controller.checkpoint_store)  # type: ignore[arg-type]
        if snap is not None:
            controller.restore(snap)
            await controller.metrics.resume()  # the metrics endpoint where it was
    path = os.path.join(session_dir, CONTROLLER_SOCKET)
    tmp = path + ".tmp"
    server = await serve_unix(tmp, lambda: controller, name="controller")
    os.rename(tmp, path)  # appears only once it accepts connections
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: controller.spawn(controller.shutdown()))
    runner = loop.create_task(controller.run())
    controller.spawn(MemoryMonitor(controller).run())  # memory limits, machine monitor (embedded runtime only)
    admin = None
    if args.instance_dir:
        admin = await _start_detached(controller, session_dir, args)
    elif keeper.KEEPER_PID_ENV in os.environ:
        loop.create_task(_watch_owner(controller))
    await controller.done.wait()
    if admin is not None:
        from shoal import instance

        instance.remove_info(args.instance_dir, os.getpid())
        await admin.stop()
    await asyncio.sleep(0.05)  # let the shutdown reply reach the driver
    server.close()
    runner.cancel()
    runtime.close()


async def _watch_owner(controller: Controller) -> None:
    """A driver-owned controller ends with its driver, also when the driver died while this
    controller was (re)starting and so never saw its connection close."""
    while not controller.done.is_set():
        await asyncio.sleep(0.5)
        if not keeper.keeper_alive() and not controller.shutting_down:
            logging.getLogger("shoal.controller").info("the driver that started shoal is gone; shutting down")
            await controller.shutdown()


async def _start_detached(controller: Controller, session_dir: str, args: argparse.Namespace) -> Optional[object]:
    from shoal import instance
    from shoal.controller.admin_api import AdminServer

    http_options = json.loads(args.http_options or "{}")
    controller.proxies.configure(http_options)  # a recovered controller keeps the options it had
    from shoal.telemetry.exporter import export_options

    await controller.metrics.configure(export_options())  # SHOAL_METRICS_EXPORT_PORT/_HOST (no-op if resumed)
    # A restarted controller answers on the port its predecessor had: the CLI finds it unchanged.
    token = instance.read_token(args.instance_dir)
    try:
        admin = AdminServer(controller, token, controller.checkpoint_extra.get("admin_port") or args.admin_port)
    except OSError:  # taken meanwhile: the CLI reads the new one from instance.json
        admin = AdminServer(controller, token, args.admin_port)
    await admin.start()
    controller.checkpoint_extra["admin_port"] = admin.port
    controller.save_checkpoint()
    instance.write_info(args.instance_dir, instance.InstanceInfo(
        pid=os.getpid(), session_dir=session_dir, admin_url=admin.url, http_options=http_options,
        runtime=args.runtime, address=args.address,
        supervisor_pid=int(os.environ.get(keeper.KEEPER_PID_ENV) or 0) or None))
    logging.getLogger("shoal.controller").info("detached instance ready; admin API at %s", admin.url)
    return admin


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal.controller")
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--logs-dir", default=None)
    parser.add_argument("--instance-dir", default=None, help="run detached, recorded in this directory")
    parser.add_argument("--http-options", default=None, help="JSON; detached instances only")
    parser.add_argument("--admin-port", type=int, default=0)
    parser.add_argument("--runtime", default="embedded", choices=["embedded"])
    parser.add_argument("--address", default=None)
    parser.add_argument("--recover", action="store_true",
                        help="a restart: load the checkpoint in the session directory and adopt what still runs")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the driver, which shuts us down
    logs_dir = args.logs_dir or os.path.join(args.session_dir, "logs")
    os.makedirs(logs_dir, exist_ok=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="(shoal controller) %(levelname)s %(asctime)s -- %(message)s")
    from shoal.serve_logging import configure_system_logging
    from shoal.sessions import drop_implicit_cwd

    drop_implicit_cwd()
    configure_system_logging("controller")
    from shoal.log_rotation import setup_rotation

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    setup_rotation(loop)  # a detached controller's controller.log rotates by size (log_rotation.py)
    loop.run_until_complete(_main(args.session_dir, logs_dir, args))
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
