"""The core, HTTP and batching suites again, on the Ray runtime (a three-node cluster on this machine).

The tests are imported from their own modules, unchanged: only `serve_instance` differs, so the
same assertions hold for replicas that are Ray actors reached over authenticated TCP. Chosen are
those whose behaviour is meant to be the same on both runtimes (not process ids, Unix socket paths
one-machine resource accounting, or log files in the session directory), enough to cover calls, errors, streaming, composition,
cancellation, back-pressure, HTTP conversion and routing, and batching.
"""

from __future__ import annotations

import pytest

from shoal import serve

from ray_cluster import ray_cluster_fixture

pytestmark = pytest.mark.slow
ray_cluster = ray_cluster_fixture()


@pytest.fixture(scope="module")
def serve_instance(ray_cluster):
    # One proxy: HTTP back-pressure is per proxy (as in Ray Serve), and the HTTP tests count on one
    # queue. Proxies on every node are tested in test_ray_cluster.py.
    serve.start(runtime="ray", http_options={"port": 0}, proxy_location="HeadOnly")
    assert len(serve.status().proxies) == 1
    yield


from test_handles import (  # noqa: E402,F401
    test_cancel_during_execution_reaches_replica,
    test_composition_pipeline,
    test_handles_work_from_threads,
    test_max_ongoing_requests_enforced_across_callers,
    test_replica_death_fails_request_and_is_replaced,
    test_response_is_awaitable_and_repeatable_from_asyncio,
    test_responses_as_arguments_and_nested_error,
    test_streaming_errors,
    test_streaming_sync_and_async_generators,
    test_sync_and_async_methods_and_function_deployment,
    test_user_exception_keeps_type_and_message,
)
from test_http import (  # noqa: E402,F401
    test_backpressure_503,
    test_client_disconnect_cancels_replica_and_downstream,
    test_generator_streams_chunks_before_it_finishes,
    test_longest_prefix_routing_and_system_routes,
    test_request_parts_reach_the_deployment,
    test_return_value_conversion,
    url,
)
from test_batching_e2e import (  # noqa: E402,F401
    test_batched_generator_streams_reach_the_right_callers,
    test_batching_over_http,
    test_concurrent_handle_calls_form_batches,
)
from test_examples import test_composition_example, test_composition_example_over_http  # noqa: E402,F401
