"""Resource accounting of the embedded runtime: CPUs, GPUs via CUDA_VISIBLE_DEVICES, custom resources."""

from __future__ import annotations

import os
import threading

import pytest

from shoal import serve

from conftest import wait_for


@pytest.fixture(scope="module")
def gpu_instance():
    """An instance that believes the machine has 2 GPUs, 2 CPUs and one custom resource."""
    serve.shutdown()
    saved = {k: os.environ.get(k) for k in ("SHOAL_NUM_GPUS", "SHOAL_NUM_CPUS", "SHOAL_RESOURCES")}
    os.environ.update(SHOAL_NUM_GPUS="2", SHOAL_NUM_CPUS="2", SHOAL_RESOURCES='{"accel": 1}')
    serve.start()
    yield
    serve.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@serve.deployment
class Visible:
    def __call__(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


def _devices(handle, n_replicas):
    seen = {}
    for _ in range(200):
        dev, pid = handle.remote().result()
        seen[pid] = dev
        if len(seen) == n_replicas:
            break
    return sorted(seen.values())


def test_fractional_gpus_share_a_device(gpu_instance):
    h = serve.run(Visible.options(num_replicas=2, ray_actor_options={"num_gpus": 0.5}).bind(), name="half")
    assert _devices(h, 2) == ["0", "0"]
    serve.delete("half")


def test_whole_gpus_get_distinct_devices(gpu_instance):
    h = serve.run(Visible.options(num_replicas=2, ray_actor_options={"num_gpus": 1}).bind(), name="whole")
    assert _devices(h, 2) == ["0", "1"]
    serve.delete("whole")


def test_replica_without_gpu_request_sees_none(gpu_instance):
    h = serve.run(Visible.bind(), name="nogpu")
    assert h.remote().result()[0] == ""
    serve.delete("nogpu")


def test_over_request_stays_pending_until_resources_free(gpu_instance):
    first = serve.run(Visible.options(name="first", ray_actor_options={"num_gpus": 2}).bind(), name="first",
                      route_prefix="/first")
    assert first.remote().result()[0] == "0,1"
    errors = []
    result = {}

    def deploy_second():
        try:
            result["h"] = serve.run(Visible.options(name="second", ray_actor_options={"num_gpus": 1}).bind(),
                                    name="second", route_prefix="/second")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=deploy_second)
    t.start()

    def pending():
        app = serve.status().applications.get("second")
        return app and "GPU: 1 (0 GPU free of 2)" in app.deployments["second"].message

    wait_for(pending, what="the second app to wait for a GPU")
    serve.delete("first")  # frees both GPUs: the pending replica is placed
    t.join(timeout=30)
    assert not errors and result["h"].remote().result()[0] in ("0", "1")
    serve.delete("second")


def test_cpus_and_custom_resources_are_accounted(gpu_instance):
    h = serve.run(Visible.options(num_replicas=2, ray_actor_options={"num_cpus": 1, "resources": {"accel": 0.5}})
                  .bind(), name="cpu")
    assert len(_devices(h, 2)) == 2
    # Both CPUs and the whole accelerator are now taken: a third replica cannot be placed.
    errors = []
    t = threading.Thread(target=lambda: errors.append(_try_run(
        Visible.options(name="third", ray_actor_options={"resources": {"accel": 0.5}}).bind(), "third")))
    t.start()

    def pending():
        app = serve.status().applications.get("third")
        return app and "accel: 0.5 (0 accel free of 1)" in app.deployments["third"].message

    wait_for(pending)
    serve.delete("third")
    t.join(timeout=30)
    serve.delete("cpu")


def _try_run(app, name):
    try:
        serve.run(app, name=name, route_prefix="/" + name)
    except Exception as e:  # noqa: BLE001
        return e
    return None
