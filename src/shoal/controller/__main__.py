"""Entry point of the controller process: `python -m shoal.controller --session-dir DIR`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from shoal.client import CONTROLLER_SOCKET, new_event_loop
from shoal.controller.controller import Controller
from shoal.runtime.embedded import EmbeddedRuntime
from shoal.transport.connection import serve_unix


async def _main(session_dir: str, logs_dir: str) -> None:
    runtime = EmbeddedRuntime(session_dir, logs_dir)
    controller = Controller(runtime)
    path = os.path.join(session_dir, CONTROLLER_SOCKET)
    tmp = path + ".tmp"
    server = await serve_unix(tmp, lambda: controller, name="controller")
    os.rename(tmp, path)  # appears only once it accepts connections
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: controller.spawn(controller.shutdown()))
    runner = loop.create_task(controller.run())
    await controller.done.wait()
    await asyncio.sleep(0.05)  # let the shutdown reply reach the driver
    server.close()
    runner.cancel()
    runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m shoal.controller")
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--logs-dir", default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the driver, which shuts us down
    logs_dir = args.logs_dir or os.path.join(args.session_dir, "logs")
    os.makedirs(logs_dir, exist_ok=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="(shoal controller) %(levelname)s %(asctime)s -- %(message)s")
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_main(args.session_dir, logs_dir))
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
