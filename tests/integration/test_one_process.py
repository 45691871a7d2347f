"""The one-process layout (`layout: one-process`): one deployment that holds the preprocessor and the
encoder, serving the same API with the same vectors as the three pools."""

import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.cloudpickle
import requests
from ray import serve

from serve_app.app import build_app
from serve_app.config import AppArgs, ImageLimits, ZeroShotSettings
from serve_app.ingress import OpenAIIngress
from tests.conftest import TINY_NAME, b64, data_uri, driver_handle, encode, random_image
from tests.integration.test_api import JPEG, PNG_RGBA, assert_error, assert_same, expected_image, expected_text, post, vectors
from tests.integration.test_faults import FaultyEncoder, assert_three_failures_fail_the_health_check

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def one_process_args(tiny_model_dir: Path) -> dict:
    return {
        "layout": "one-process",
        "model": f"local-dir:{tiny_model_dir}",
        "served_model_name": TINY_NAME,
        "torch_threads": 1,
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.02,
        "encoder": {"num_replicas": 1, "num_cpus": 0.25, "max_ongoing_requests": 128},
        "max_inputs_per_request": 64,
    }


@pytest.fixture(scope="module")
def one_url(serve_url, tiny_model_dir):
    serve.run(build_app(one_process_args(tiny_model_dir)), name="one", route_prefix="/one")
    yield serve_url + "/one"
    serve.delete("one")


def test_one_deployment_serves_vectors_equal_to_open_clip(one_url, reference):
    deployments = serve.status().applications["one"].deployments
    assert set(deployments) == {"OpenAIIngress"}
    body = {"input": ["a photo of a dog", {"image": b64(JPEG)}, {"type": "image_url", "image_url": {"url": data_uri(PNG_RGBA)}}]}
    got = vectors(post(one_url, body))
    assert_same(got[0], expected_text(reference, "a photo of a dog"))
    assert_same(got[1], expected_image(reference, JPEG))
    assert_same(got[2], expected_image(reference, PNG_RGBA))
    assert requests.get(one_url + "/health", timeout=30).json()["models"][TINY_NAME]["ok"] is True


def test_classify_and_rerank_in_one_process(one_url, reference):
    response = post(one_url, {"input": [{"image": b64(JPEG)}], "labels": ["cat", "dog", "car"]}, path="/v1/classify")
    assert response.status_code == 200, response.text
    scores = [p["score"] for p in response.json()["data"][0]["predictions"]]
    assert len(scores) == 3 and abs(sum(scores) - 1) < 1e-5 and scores == sorted(scores, reverse=True)
    response = post(one_url, {"query": "a dog", "documents": ["a dog", "a car"]}, path="/v1/rerank")
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["index"] == 0  # identical text scores highest


def test_concurrent_requests_and_bad_items_fail_alone(one_url, reference):
    images = [encode(random_image(90 + i, 70, seed=300 + i), "JPEG") for i in range(6)]
    bodies = [{"input": [{"image": b64(image)}, f"caption {i}"]} for i, image in enumerate(images)]
    bad = {"input": [{"image": b64(b"not an image")}]}
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda b: post(one_url, b), bodies * 2 + [bad] * 4))
    for i, response in enumerate(responses[: 2 * len(bodies)]):
        got = vectors(response)
        assert_same(got[0], expected_image(reference, images[i % len(images)]))
        assert_same(got[1], expected_text(reference, f"caption {i % len(images)}"))
    for response in responses[2 * len(bodies):]:
        assert_error(response, 400, "input[0]")


def test_a_failing_in_process_encoder_gives_503_and_fails_the_replica_health_check(serve_url, tiny_model_dir, tmp_path):
    flag = tmp_path / "fail"
    flag.touch()  # test_faults' FaultyEncoder fails every forward pass after its warm-up while this exists

    class FailingIngress(OpenAIIngress.func_or_class):
        async def __init__(self, *args, **kwargs):
            import serve_app.in_process

            faulty = partial(FaultyEncoder, flag=str(flag))
            serve_app.in_process.ClipEncoder = SimpleNamespace(func_or_class=faulty)  # this replica only
            await super().__init__(*args, **kwargs)

    spec = AppArgs.model_validate(one_process_args(tiny_model_dir)).model_specs()[0]
    app = OpenAIIngress.options(func_or_class=FailingIngress, ray_actor_options={"num_cpus": 0.25}).bind(
        None, None, [spec], 16, ZeroShotSettings(), ImageLimits()
    )
    serve.run(app, name="one-failing", route_prefix="/one-failing")
    try:
        assert_three_failures_fail_the_health_check(serve_url + "/one-failing", "OpenAIIngress", "one-failing")
    finally:
        serve.delete("one-failing")


def test_batching_reaches_the_in_process_encoder_through_user_config(one_url):
    handle = driver_handle("OpenAIIngress", app_name="one")
    before = handle.in_process_info.remote().result(timeout_s=30)[TINY_NAME]
    assert before["batching"]["max_batch_size"] == 8  # from the app's args, through user_config
    handle.reconfigure.remote({"max_batch_size": 3, "batch_wait_timeout_s": 0.001}).result(timeout_s=30)
    after = handle.in_process_info.remote().result(timeout_s=30)[TINY_NAME]
    assert after["batching"]["max_batch_size"] == 3 and after["pid"] == before["pid"]
    assert post(one_url, {"input": ["after reconfigure"]}).status_code == 200
