"""The CLI's side of the admin REST API: find the instance, send the token, turn answers into errors."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import httpx

from shoal import instance


class AdminError(RuntimeError):
    """The instance refused a request; `problems` holds its error lines (config errors: one per line)."""

    def __init__(self, problems: list[str], status_code: int = 0):
        self.problems = problems
        self.status_code = status_code
        super().__init__("\n".join(problems))


class NoInstanceError(RuntimeError):
    pass


def _wait_s() -> float:
    return float(os.environ.get("SHOAL_CONTROLLER_WAIT_S") or 30.0)


def _notice(message: str) -> None:
    sys.stderr.write(f"shoal: {message}\n")
    sys.stderr.flush()


class AdminClient:
    def __init__(self, info: instance.InstanceInfo, token: str, timeout: float = 30.0, instance_dir: str = ""):
        self.info = info
        self.instance_dir = instance_dir
        self.http = httpx.Client(base_url=info.admin_url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=timeout, trust_env=False)

    @classmethod
    def connect(cls, instance_dir: str) -> "AdminClient":
        info = instance.read_info(instance_dir)
        if info is None:
            raise NoInstanceError(f"no shoal instance is running (looked in {instance_dir}); "
                                  "start one with `shoal start`.")
        client = cls(info, instance.read_token(instance_dir), instance_dir=instance_dir)
        if instance.restarting(info):
            client._wait_for_restart()
        return client

    def _wait_for_restart(self) -> None:
        """The controller died and its supervisor restarts it: wait (bounded) for the new one."""
        wait_s = _wait_s()
        _notice(f"the controller is restarting (pid {self.info.pid} exited; supervisor pid "
                f"{self.info.supervisor_pid}); waiting up to {wait_s:g} s for it")
        info = instance.wait_for_controller(self.instance_dir, wait_s)
        if info is None:
            raise NoInstanceError(f"the shoal instance in {self.instance_dir} stopped while its controller "
                                  "was restarting.")
        if instance.restarting(info):
            raise AdminError([f"the shoal controller is restarting and did not come back within {wait_s:g} s "
                              "(SHOAL_CONTROLLER_WAIT_S); applications keep serving meanwhile. Try again shortly."])
        self.info = info
        self.http.base_url = httpx.URL(info.admin_url)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            info = instance.read_info(self.instance_dir) if self.instance_dir else None
            if info is None or not (instance.restarting(info) or info.pid != self.info.pid):
                raise AdminError([f"cannot reach the instance's admin API at {self.info.admin_url}: {e}"]) from None
            if method != "GET" and not isinstance(e, httpx.ConnectError):
                # It died while handling a change: repeating it blindly could repeat what killed it.
                raise AdminError([f"the shoal controller died while handling this request and is being "
                                  f"restarted; check `shoal status`, then run the command again."]) from None
            self.info = info  # not sent, or a read: safe to repeat on the new controller
            if instance.restarting(info):
                self._wait_for_restart()
            else:
                self.http.base_url = httpx.URL(info.admin_url)
            return self._request(method, path, **kwargs)
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = {}
            problems = body.get("errors") or [body.get("error") or f"HTTP {r.status_code}: {r.text[:200]}"]
            raise AdminError(problems, r.status_code)
        return r.json()

    def status(self, wait_routes: bool = False) -> dict:
        return self._request("GET", "/api/serve/status", params={"wait_routes": "1"} if wait_routes else None)

    def applications(self) -> dict:
        return self._request("GET", "/api/serve/applications/")

    def deploy(self, config: dict, app_dir: Optional[str] = None, build_timeout: Optional[float] = None) -> dict:
        """PUT the config; the instance builds it (killing the build after `build_timeout` s, else after
        its own default) and applies it. Closing the connection early stops the build."""
        params: dict = {"app_dir": app_dir} if app_dir else {}
        if build_timeout is not None:
            params["build_timeout_s"] = repr(float(build_timeout))
        # The answer comes once the build is over: wait a minute longer than the build may take.
        wait = (build_timeout if build_timeout is not None else 300.0) + 60.0
        return self._request("PUT", "/api/serve/applications/", json=config, params=params or None, timeout=wait)

    def shutdown(self) -> None:
        self._request("DELETE", "/api/serve/applications/")

    def dashboard_login(self) -> dict:
        """A one-time login link for the web dashboard: {"code", "login_url", "expires_in_s"}."""
        return self._request("POST", "/api/dashboard/login-code")

    def close(self) -> None:
        self.http.close()
