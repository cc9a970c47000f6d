"""User metrics, shaped like `ray.serve.metrics`: `Counter`, `Gauge` and `Histogram`.

    from shoal.serve import metrics   # or: from shoal import metrics

    @serve.deployment
    class Model:
        def __init__(self):
            self.hits = metrics.Counter("model_hits", description="Cache hits.", tag_keys=("model",))
            self.hits.set_default_tags({"model": "v1"})

        async def __call__(self, request):
            self.hits.inc()

Inside a replica each metric also gets the `deployment`, `replica` and `application` tags (reserved:
passing them yourself is an error); a `route` tag you declare is filled in from the request when
you do not give it. As with Ray, metrics are exported with the `ray_` prefix (`ray_model_hits_total`)
on the instance's endpoint (see docs/observability.md); they travel with the process's other
metrics, about once a second. Recording is thread-safe.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple, Union

from shoal.telemetry.registry import COUNTER, GAUGE, HISTOGRAM, REGISTRY

DEPLOYMENT_TAG = "deployment"
REPLICA_TAG = "replica"
APPLICATION_TAG = "application"
ROUTE_TAG = "route"
_RESERVED = (DEPLOYMENT_TAG, REPLICA_TAG, APPLICATION_TAG)
_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
PREFIX = "ray_"  # Ray's metrics agent exports every metric under the `ray` namespace

Number = Union[int, float]


def _replica_tags() -> Optional[Dict[str, str]]:
    from shoal.context import _replica_context

    ctx = _replica_context
    if ctx is None:
        return None
    return {DEPLOYMENT_TAG: ctx.deployment, REPLICA_TAG: ctx.replica_tag, APPLICATION_TAG: ctx.app_name}


class _Metric:
    _kind = COUNTER

    def __init__(self, name: str, description: str = "", tag_keys: Optional[Tuple[str, ...]] = None,
                 boundaries: Optional[List[float]] = None):
        if not isinstance(name, str) or not name:
            raise ValueError("Empty name is not allowed. Please provide a metric name.")
        if not _NAME.match(name):
            raise ValueError(f"Invalid metric name {name!r}: use letters, digits, '_' and ':' "
                             "(and no digit first).")
        if tag_keys is None:
            tag_keys = ()
        if not isinstance(tag_keys, tuple):
            raise TypeError(f"tag_keys should be a tuple type, got: {type(tag_keys)}")
        for key in tag_keys:
            if not isinstance(key, str):
                raise TypeError(f"Tag keys must be str, got {type(key)}.")
            if not _LABEL.match(key) or key.startswith("__"):
                raise ValueError(f"Invalid tag key {key!r}: use letters, digits and '_' (no digit first, "
                                 "no leading '__').")
        serve_tags = _replica_tags()
        if serve_tags is not None:
            for key in _RESERVED:
                if key in tag_keys:
                    raise ValueError(f"'{key}' tag is reserved for Ray Serve metrics")
            tag_keys = _RESERVED + tag_keys
        self._name = name
        self._description = description
        self._tag_keys: Tuple[str, ...] = tag_keys
        self._default_tags: Dict[str, str] = dict(serve_tags or {})
        self._serve_tags = serve_tags
        self._metric = REGISTRY.metric(PREFIX + name, self._kind, description, tag_keys, boundaries)

    @property
    def info(self) -> dict:
        return {"name": self._name, "description": self._description, "tag_keys": self._tag_keys,
                "default_tags": dict(self._default_tags)}

    def set_default_tags(self, default_tags: Dict[str, str]) -> "_Metric":
        """Tags used when a record call does not give them (a replica's own tags stay)."""
        if self._serve_tags is not None:
            for key in _RESERVED:
                if key in default_tags:
                    raise ValueError(f"'{key}' tag is reserved for Ray Serve metrics")
        for key, value in default_tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key!r}; the tag keys are {self._tag_keys}.")
            if not isinstance(value, str):
                raise TypeError(f"Tag values must be str, got {type(value)} for {key!r}.")
        self._default_tags = {**default_tags, **(self._serve_tags or {})}
        return self

    def _values(self, tags: Optional[Dict[str, str]]) -> tuple:
        if tags:
            if self._serve_tags is not None:
                for key in _RESERVED:
                    if key in tags:
                        raise ValueError(f"'{key}' tag is reserved for Ray Serve metrics")
            for key, value in tags.items():
                if key not in self._tag_keys:
                    raise ValueError(f"Unrecognized tag key {key!r}; the tag keys are {self._tag_keys}.")
                if not isinstance(value, str):
                    raise TypeError(f"Tag values must be str, got {type(value)} for {key!r}.")
            merged = {**self._default_tags, **tags}
        else:
            merged = self._default_tags
        if ROUTE_TAG in self._tag_keys and ROUTE_TAG not in merged:
            from shoal.context import current_request_context

            merged = {**merged, ROUTE_TAG: current_request_context().route}
        missing = [k for k in self._tag_keys if k not in merged]
        if missing:
            raise ValueError(f"Missing value for tag key(s): {', '.join(missing)}.")
        return tuple(merged[k] for k in self._tag_keys)


class Counter(_Metric):
    """A cumulative metric that only goes up (a Prometheus counter: exported as `ray_<name>_total`)."""

    _kind = COUNTER

    def __init__(self, name: str, description: str = "", tag_keys: Optional[Tuple[str, ...]] = None):
        super().__init__(name, description, tag_keys)

    def inc(self, value: Number = 1.0, tags: Optional[Dict[str, str]] = None) -> None:
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self._metric.inc(self._values(tags), float(value))


class Gauge(_Metric):
    """The last value set (a Prometheus gauge)."""

    _kind = GAUGE

    def __init__(self, name: str, description: str = "", tag_keys: Optional[Tuple[str, ...]] = None):
        super().__init__(name, description, tag_keys)

    def set(self, value: Optional[Number], tags: Optional[Dict[str, str]] = None) -> None:
        if value is None:
            return
        if not isinstance(value, (int, float)):
            raise TypeError(f"value must be int or float, got {type(value)}.")
        self._metric.set(self._values(tags), float(value))


class Histogram(_Metric):
    """Observations counted in buckets (a Prometheus histogram with `_bucket`, `_sum` and `_count`)."""

    _kind = HISTOGRAM

    def __init__(self, name: str, description: str = "", boundaries: Optional[List[float]] = None,
                 tag_keys: Optional[Tuple[str, ...]] = None):
        if not boundaries:
            raise ValueError("boundaries must be a non-empty list of numbers.")
        for i, b in enumerate(boundaries):
            if not isinstance(b, (int, float)) or b <= 0:
                raise ValueError(f"Invalid `boundaries` argument at index {i}, {boundaries}. "
                                 "Use positive values for the arguments.")
        if list(boundaries) != sorted(set(boundaries)):
            raise ValueError(f"boundaries must be strictly increasing, got {boundaries}.")
        self.boundaries = list(boundaries)
        super().__init__(name, description, tag_keys, boundaries)

    def observe(self, value: Number, tags: Optional[Dict[str, str]] = None) -> None:
        if not isinstance(value, (int, float)):
            raise TypeError(f"value must be int or float, got {type(value)}.")
        self._metric.observe(self._values(tags), float(value))


def metrics_export_url() -> Optional[str]:
    """Where the running instance serves Prometheus metrics (None: the endpoint is off). On the Ray
    runtime, where each node has its endpoint: the one of this process's node (else the head's)."""
    from shoal import client as client_mod

    return client_mod.get_global_client().call_sync("metrics_url")


def metrics_export_urls() -> Dict[str, str]:
    """Every metrics endpoint of the running instance, by Ray node id (one machine: one, under "")."""
    from shoal import client as client_mod

    return client_mod.get_global_client().call_sync("metrics_urls")


def metrics_text() -> str:
    """The instance's metrics now, in Prometheus' text format (what a scrape of the endpoint returns)."""
    from shoal import client as client_mod

    return client_mod.get_global_client().call_sync("metrics_text")


async def metrics_text_async() -> str:
    """`metrics_text()` for async code (a replica's methods, an ASGI app)."""
    from shoal import client as client_mod

    return await client_mod.get_global_client().call("metrics_text")


__all__ = ["Counter", "Gauge", "Histogram", "metrics_export_url", "metrics_export_urls", "metrics_text",
           "metrics_text_async"]
