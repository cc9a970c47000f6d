"""Metrics: every process counts locally, the controller gathers them into one Prometheus endpoint.

How values from many processes meet (docs/observability.md has the long version):

- **On the request path** a process only updates plain numbers in its own memory: an int in a
  list, a float sum, a bucket count found with `bisect`. No `prometheus_client` object, lock,
  string formatting or I/O is touched per request. Gauges such as "requests in flight" are not
  kept at all: they are read from state the process keeps anyway (a replica's `ongoing`, a
  router's queue) when a snapshot is taken.
- **Once a second** (`SHOAL_METRICS_PUSH_INTERVAL_S`) each process with a controller connection
  (driver, HTTP proxy, replica) builds a snapshot of all its metrics, cumulative since it started,
  and sends it as one `metrics` NOTIFY on that connection, but only when it differs from the last
  one sent (so a gauge returning to 0 is sent, an idle process sends nothing).
- **The controller** keeps the latest snapshot per connection. When a connection ends, the
  counters and histograms of that process are kept (gauges are dropped), so sums never go
  backwards; series that name the ended replica itself are dropped 10 minutes later. A scrape
  merges everything (samples with equal labels are summed) and renders it through a
  `prometheus_client` custom collector on `http://127.0.0.1:8080/metrics` (`exporter.py`,
  `endpoint.py`). On the Ray runtime the endpoints are per node: an exporter actor on each node
  serves the slice its node's processes pushed (`node_exporter.py`).

`registry.py` holds the per-process store and the pusher, `serve_metrics.py` Ray Serve's metrics,
`exporter.py` the controller side, `endpoint.py` the HTTP endpoint, `node_exporter.py` a Ray node's.
"""
