"""Replica faults and run-time reconfiguration, against the live Serve instance of the session.

A failing encoder is the real ClipEncoder whose forward passes raise while a flag file exists: /health
turns 503 (its probe encode fails), requests get a 503 in OpenAI shape (never a hang), Ray's replica
health check reports the replica unhealthy, and everything recovers when the fault clears.
"""

import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import requests
from ray import serve

from serve_app.config import ImageLimits, ModelSpec, ZeroShotSettings
from serve_app.encoder import ClipEncoder
from serve_app.ingress import OpenAIIngress
from serve_app.preprocess import Preprocessor
from tests.conftest import TINY_NAME, app_args, deploy_config, driver_handle
from tests.integration.test_api import assert_error, post

# Workers cannot import this test module: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FaultyEncoder(ClipEncoder.func_or_class):
    """The production encoder, whose forward passes fail while `flag` exists."""

    def __init__(self, spec: ModelSpec, flag: str) -> None:
        super().__init__(spec)
        for name in ("encode_images", "encode_texts"):
            setattr(self._core, name, self._faulty(getattr(self._core, name), Path(flag)))

    @staticmethod
    def _faulty(forward, flag: Path):
        def run(rows):
            if flag.exists():
                raise RuntimeError("simulated device failure")
            return forward(rows)

        return run


@pytest.fixture(scope="module")
def faulty_url(serve_url, tiny_model_dir, tmp_path_factory):
    flag = tmp_path_factory.mktemp("fault") / "fail"
    spec = ModelSpec(model=f"local-dir:{tiny_model_dir}", served_model_name=TINY_NAME, torch_threads=1,
                     health_max_age_s=0.5)
    encoder = serve.deployment(FaultyEncoder).options(
        name="FaultyEncoder", ray_actor_options={"num_cpus": 0.25}, health_check_period_s=1,
        user_config={"max_batch_size": 4},
    ).bind(spec, str(flag))
    preprocessor = Preprocessor.options(ray_actor_options={"num_cpus": 0.25}).bind([spec], ImageLimits())
    app = OpenAIIngress.options(ray_actor_options={"num_cpus": 0.25}).bind(
        preprocessor, {TINY_NAME: encoder}, [spec], 16, ZeroShotSettings()
    )
    serve.run(app, name="faulty", route_prefix="/faulty", blocking=False)
    yield serve_url + "/faulty", flag
    serve.delete("faulty")


def assert_three_failures_fail_the_health_check(url: str, deployment: str, app_name: str) -> None:
    """Three requests in a row get an OpenAI-style 503; the third failure in a row makes Ray's replica health
    check of `deployment` fail."""
    for _ in range(3):
        assert_error(post(url, {"input": ["x"]}), 503, None, "encoder failed")
    handle = driver_handle(deployment, app_name=app_name)
    with pytest.raises(Exception, match="forward passes failed in a row"):
        handle.check_health.remote().result(timeout_s=30)


def test_encoder_failure_gives_503_and_unhealthy_then_recovers(faulty_url):
    url, flag = faulty_url
    assert requests.get(url + "/health", timeout=30).status_code == 200
    flag.touch()
    try:
        time.sleep(0.6)  # past health_max_age_s: /health must probe with a real encode
        health = requests.get(url + "/health", timeout=30)
        assert health.status_code == 503
        assert health.json()["models"][TINY_NAME]["ok"] is False
        assert "probe encode failed" in health.json()["models"][TINY_NAME]["detail"]
        assert_three_failures_fail_the_health_check(url, "FaultyEncoder", "faulty")
    finally:
        flag.unlink()
    deadline = time.monotonic() + 60  # the same replica recovers, or Ray replaced it
    while time.monotonic() < deadline:
        try:
            if post(url, {"input": ["x"]}).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        pytest.fail("no recovery after the fault cleared")
    assert requests.get(url + "/health", timeout=30).status_code == 200


def test_batching_changes_at_run_time_without_a_restart(serve_url, tiny_model_dir, second_model_dir):
    """An operator edits the encoder's `user_config` in the Serve config (as in KubeRay's serveConfigV2)."""
    name = f"ClipEncoder-{TINY_NAME}"
    handle = driver_handle(name)
    before = handle.info.remote().result(timeout_s=30)
    args = app_args(tiny_model_dir, second_model_dir)
    batching = {"max_batch_size": 3, "batch_wait_timeout_s": 0.001, "text_max_batch_size": 5,
                "refill_wait_fraction": 0.0}
    deploy_config(args, deployments=[{"name": name, "user_config": batching}])
    try:
        after = handle.info.remote().result(timeout_s=30)
        assert after["pid"] == before["pid"]  # reconfigured in place, not restarted
        assert after["batching"]["max_batch_size"] == 3 and after["batching"]["text_max_batch_size"] == 5
        assert before["batching"]["max_batch_size"] == 8
        assert after["gate"]["refill_wait_fraction"] == 0.0 and before["gate"]["refill_wait_fraction"] == 0.5
        response = post(serve_url, {"model": TINY_NAME, "input": [f"text {i}" for i in range(12)]})
        assert response.status_code == 200 and len(response.json()["data"]) == 12
    finally:
        deploy_config(args)
    restored = handle.info.remote().result(timeout_s=30)
    assert restored["batching"]["max_batch_size"] == 8 and restored["pid"] == before["pid"]
