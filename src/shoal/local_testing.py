"""Local testing mode: the whole application in this process, for fast unit tests.

`serve.run(app, _local_testing_mode=True)` constructs every deployment eagerly on one event-loop
thread (constructor errors raise from `serve.run`) and routes handle calls straight to them,
round-tripping arguments through pickle as a real replica would. No controller, no processes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Optional

from shoal.common import DeploymentID
from shoal.config import ReplicaRank
from shoal.context import RequestContext, _request_context
from shoal.exceptions import RayServeException, RequestCancelledError
from shoal.handle import DeploymentHandle, DeploymentResponse, _Request
from shoal.replica.user_callable import UserCallable
from shoal.transport import serialization as ser

logger = logging.getLogger("shoal.local_test")

_loop_thread: Optional[tuple[asyncio.AbstractEventLoop, threading.Thread]] = None
_apps: dict[str, str] = {}  # app name -> ingress deployment name
_routers: dict[DeploymentID, "LocalRouter"] = {}
_handles: dict[DeploymentID, DeploymentHandle] = {}  # one per deployment, as serve.get_*_handle give out


def _local_loop() -> asyncio.AbstractEventLoop:
    global _loop_thread
    if _loop_thread is None:
        loop = asyncio.new_event_loop()
        t = threading.Thread(target=loop.run_forever, name="shoal-local", daemon=True)
        t.start()
        _loop_thread = (loop, t)
    return _loop_thread[0]


class LocalRouter:
    """Stands in for a router: runs each call on the in-process deployment."""

    def __init__(self, deployment_id: DeploymentID, callable_: UserCallable, loop: asyncio.AbstractEventLoop):
        self.deployment_id = deployment_id
        self.callable = callable_
        self.loop = loop
        self.closed = False
        self.sync_loop = None
        self._tasks: dict[int, asyncio.Task] = {}

    def assign(self, resp: _Request) -> None:
        task = self.loop.create_task(self._run(resp))
        self._tasks[id(resp)] = task
        task.add_done_callback(lambda _t: self._tasks.pop(id(resp), None))

    async def _run(self, resp: _Request) -> None:
        try:
            args = [await a if isinstance(a, DeploymentResponse) else a for a in resp.args]
            kwargs = {k: (await v if isinstance(v, DeploymentResponse) else v) for k, v in resp.kwargs.items()}
            args, kwargs = ser.loads(ser.dumps_call_args(tuple(args), kwargs, f"the call to '{resp.method_name}'"))
            _request_context.set(RequestContext(resp.request_id, resp.multiplexed_model_id, self.deployment_id.app_name))
            if resp.stream:
                async for item in self.callable.call_stream(resp.method_name, args, kwargs):
                    resp._push(ser.loads(ser.dumps(item)))  # type: ignore[attr-defined]
                resp._complete()
            else:
                result = await self.callable.call(resp.method_name, args, kwargs)
                resp._complete(ser.loads(ser.dumps(result)))
        except asyncio.CancelledError:
            resp._complete(exc=RequestCancelledError(resp.request_id))
        except BaseException as e:  # noqa: BLE001
            resp._complete(exc=e)

    def cancel(self, resp: _Request) -> None:
        task = self._tasks.get(id(resp))
        if task is not None:
            task.cancel()
        else:
            resp._complete(exc=RequestCancelledError(resp.request_id))  # type: ignore[attr-defined]


def run_local(target: Any, name: str, logging_config: Any = None) -> DeploymentHandle:
    """Build the application in this process. Its `logging_config` (the last one given, as in Ray
    Serve's local testing mode) sets the level of the serve loggers here."""
    from shoal.api import build_app_spec
    from shoal.serve_logging import configure_local_testing

    spec = build_app_spec(target, name, None)
    configure_local_testing(logging_config)
    loop = _local_loop()
    built: dict[str, UserCallable] = {}

    async def construct() -> None:
        for d in spec.deployments:
            func_or_class = ser.loads_callable(d.serialized_def)
            args, kwargs = ser.loads(d.serialized_init_args)
            uc = UserCallable(func_or_class, args, kwargs, d.name, d.config.max_ongoing_requests)
            await uc.initialize()
            await uc.reconfigure(d.config.user_config, ReplicaRank(rank=0, node_rank=0, local_rank=0))
            built[d.name] = uc

    for d in spec.deployments:
        if d.config.ray_actor_options.num_gpus:
            logger.warning("num_gpus is ignored in local testing mode (deployment '%s').", d.name)
    asyncio.run_coroutine_threadsafe(construct(), loop).result()
    for dep_id in [d for d in _routers if d.app_name == name]:  # a redeploy: handles pick the new ones
        _routers.pop(dep_id).closed = True
        _handles.pop(dep_id, None)
    for dname, uc in built.items():
        _routers[DeploymentID(dname, name)] = LocalRouter(DeploymentID(dname, name), uc, loop)
    _apps[name] = spec.ingress
    return local_handle(spec.ingress, name)


def local_handle(deployment_name: str, app_name: str) -> DeploymentHandle:
    dep_id = DeploymentID(deployment_name, app_name)
    handle = _handles.get(dep_id)
    if handle is None:
        handle = _handles.setdefault(dep_id, DeploymentHandle(deployment_name, app_name))
    return handle


def local_router(deployment_id: DeploymentID) -> Optional[LocalRouter]:
    return _routers.get(deployment_id)


def is_local_app(name: str) -> bool:
    return name in _apps


def local_app_ingress(name: str) -> Optional[DeploymentHandle]:
    ingress = _apps.get(name)
    return local_handle(ingress, name) if ingress is not None else None


def shutdown_local() -> None:
    if not _routers:
        return
    loop = _local_loop()
    routers = list(_routers.values())
    _routers.clear()
    _apps.clear()
    _handles.clear()

    async def teardown() -> None:
        for r in routers:
            r.closed = True
            try:
                await r.callable.teardown()
            except Exception:  # noqa: BLE001
                logger.exception("__del__ of %s raised", r.deployment_id)
            _torn_down.append(r.callable.obj)  # keep it alive: `__del__` must not run a second time

    asyncio.run_coroutine_threadsafe(teardown(), loop).result()


_torn_down: list = []
