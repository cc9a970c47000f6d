"""`@serve.deployment` options are validated where they are written, with errors that name them."""

from __future__ import annotations

import pytest

from shoal import serve
from shoal.deployment import Deployment


def test_defaults_match_ray_serve():
    @serve.deployment
    class A:
        pass

    assert A.name == "A"
    assert A.num_replicas == 1
    assert A.max_ongoing_requests == 5
    assert A.max_queued_requests == -1
    c = A.config
    assert (c.graceful_shutdown_wait_loop_s, c.graceful_shutdown_timeout_s) == (2.0, 20.0)
    assert (c.health_check_period_s, c.health_check_timeout_s) == (10.0, 30.0)


def test_function_deployment_and_name_option():
    @serve.deployment(name="renamed", num_replicas=2)
    def f(x):
        return x

    assert f.name == "renamed"
    assert f.num_replicas == 2


@pytest.mark.parametrize("option, value, fragment", [
    ("num_replicas", 0, "num_replicas"),
    ("num_replicas", "many", "num_replicas"),
    ("max_ongoing_requests", 0, "max_ongoing_requests"),
    ("max_ongoing_requests", None, "max_ongoing_requests"),
    ("max_queued_requests", 0, "max_queued_requests"),
    ("max_queued_requests", -2, "max_queued_requests"),
    ("user_config", {"f": object()}, "user_config"),
    ("graceful_shutdown_timeout_s", -1, "graceful_shutdown_timeout_s"),
    ("health_check_period_s", 0, "health_check_period_s"),
    ("ray_actor_options", {"num_cpus": -1}, "num_cpus"),
    ("ray_actor_options", {"num_gpus": 1.5}, "num_gpus"),
    ("ray_actor_options", {"memory": -5}, "memory"),
    ("ray_actor_options", {"resources": {"TPU": -1}}, "resources"),
    ("ray_actor_options", {"num_cpu": 1}, "num_cpu"),
    ("max_replicas_per_node", 101, "max_replicas_per_node"),
    ("placement_group_strategy", "PACK", "placement_group_bundles"),
    ("placement_group_bundles", [{"CPU": 1}], None),
    ("autoscaling_config", {"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
    ("autoscaling_config", {"initial_replicas": 9, "max_replicas": 2}, "initial_replicas"),
    ("autoscaling_config", {"aggregation_function": "median"}, "aggregation_function"),
])
def test_bad_option_values_are_rejected_at_decoration(option, value, fragment):
    if fragment is None:  # a valid combination, for contrast
        serve.deployment(**{option: value})(type("X", (), {}))
        return
    with pytest.raises(ValueError) as exc:
        @serve.deployment(**{option: value})
        class X:
            pass
    assert fragment in str(exc.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(TypeError) as exc:
        serve.deployment(num_replica=2)
    assert "num_replica" in str(exc.value) and "num_replicas" in str(exc.value)


def test_num_replicas_with_autoscaling_config_is_rejected():
    with pytest.raises(ValueError, match="Manually setting num_replicas is not allowed"):
        serve.deployment(num_replicas=2, autoscaling_config={"min_replicas": 1, "max_replicas": 3})


def test_num_replicas_auto_gives_default_autoscaling():
    @serve.deployment(num_replicas="auto")
    class A:
        pass

    a = A.config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 100, 2)


def test_old_autoscaling_key_is_an_alias():
    @serve.deployment(autoscaling_config={"target_num_ongoing_requests_per_replica": 7, "max_replicas": 3})
    class A:
        pass

    assert A.config.autoscaling_config.target_ongoing_requests == 7


def test_route_prefix_on_deployment_is_rejected():
    with pytest.raises(ValueError, match="route_prefix"):
        serve.deployment(route_prefix="/a")


def test_deployment_cannot_be_constructed_or_called_directly():
    with pytest.raises(RuntimeError):
        Deployment(object, "x", None)

    @serve.deployment
    class A:
        pass

    with pytest.raises(RuntimeError, match="bind"):
        A()


def test_options_copies_and_keeps_other_options():
    @serve.deployment(max_ongoing_requests=7, ray_actor_options={"num_cpus": 0.5})
    class A:
        pass

    B = A.options(name="B", num_replicas=3)
    assert (B.name, B.num_replicas, B.max_ongoing_requests) == ("B", 3, 7)
    assert B.ray_actor_options == {"num_cpus": 0.5}
    assert (A.name, A.num_replicas) == ("A", 1)
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        A.options(max_ongoing_requests=-1)


def test_bind_builds_an_application():
    @serve.deployment
    class A:
        def __init__(self, x, y=None):
            pass

    app = A.bind(1, y=2)
    assert isinstance(app, serve.Application)
    assert app.deployment.init_args == (1,) and app.deployment.init_kwargs == {"y": 2}


def test_run_rejects_non_applications_and_bad_route_prefixes():
    @serve.deployment
    class A:
        pass

    with pytest.raises(TypeError, match="bind"):
        serve.run(A)
    with pytest.raises(TypeError):
        serve.run(object())
    for bad in ["a", "/a/", "/{x}"]:
        with pytest.raises(ValueError, match="route_prefix"):
            serve.run(A.bind(), route_prefix=bad)
    with pytest.raises(ValueError, match="name"):
        serve.run(A.bind(), name="")


def test_same_deployment_bound_twice_is_renamed():
    # As in Ray: no error; the second binding deploys as `Leaf_1` (see test_ray_parity_deploy.py).
    @serve.deployment
    class Leaf:
        def __init__(self, tag):
            self.tag = tag

        def __call__(self):
            return self.tag

    @serve.deployment
    class Root:
        def __init__(self, a, b):
            self.a, self.b = a, b

        async def __call__(self):
            return await self.a.remote(), await self.b.remote(), self.a.deployment_name, self.b.deployment_name

    h = serve.run(Root.bind(Leaf.bind(1), Leaf.bind(2)), _local_testing_mode=True)
    try:
        assert h.remote().result() == (1, 2, "Leaf", "Leaf_1")
    finally:
        serve.shutdown()


def test_status_is_empty_when_not_started():
    assert serve.status() == serve.ServeStatus()


def test_replica_context_outside_a_replica_raises():
    with pytest.raises(serve.RayServeException):
        serve.get_replica_context()
