"""What a driver sends the controller to deploy: plain data plus the user code, already pickled."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from shoal.config import DeploymentConfig


@dataclass
class DeploymentSpec:
    name: str
    serialized_def: bytes
    serialized_init_args: bytes
    config: DeploymentConfig
    user_configured_options: frozenset = frozenset()
    # The driver's import path, so replicas can import the user's modules by name.
    python_path: tuple = ()
    # Set by the config builder: a digest of the user's source files and the class's import path.
    # Pickling a class by value is not byte-identical across processes, so without it every
    # rebuild in a fresh process would look like new code and restart the replicas.
    code_fingerprint: Optional[str] = None
    # Set by `serve.run` for a deployment without a `version`: each run is new code, as in Ray Serve
    # (which gives every unversioned deployment a random code version), so re-running an unchanged
    # app replaces its replicas (their `__del__` runs, models reload). Config-file deploys leave it
    # unset: there the fingerprint decides.
    code_nonce: Optional[str] = None

    def code_version(self) -> str:
        """Changes when replicas must restart: code, constructor args, or resources."""
        h = hashlib.sha256(self.code_fingerprint.encode() if self.code_fingerprint else self.serialized_def)
        h.update(self.serialized_init_args)
        if self.code_nonce:
            h.update(self.code_nonce.encode())
        c = self.config
        h.update(json.dumps([c.ray_actor_options.model_dump(), c.placement_group_bundles,
                             c.placement_group_strategy, c.max_replicas_per_node, c.version],
                            sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    def reconfigure_version(self) -> str:
        """Changes when running replicas only need `reconfigure` (user_config, concurrency...)."""
        c = self.config
        return hashlib.sha256(json.dumps(
            [c.user_config, c.max_ongoing_requests, c.graceful_shutdown_wait_loop_s,
             c.autoscaling_config.model_dump() if c.autoscaling_config else None,
             c.logging_config.model_dump() if c.logging_config else None],
            sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ApplicationSpec:
    name: str
    route_prefix: Optional[str]
    ingress: str
    deployments: list[DeploymentSpec] = field(default_factory=list)
    # A config file's application-level `autoscaling_policy` (`AutoscalingPolicy`, pickled by value).
    autoscaling_policy: Optional[Any] = None
