"""Scaling on queue depth, back-pressure, deadlines and the operator metrics, on the session's Ray instance.

The encoder here is the production ClipEncoder whose forward pass also sleeps `pass_s`, so that a tiny model
builds a queue the way ViT-g/14 does under load. Its Ray options come from the service's own configuration
(`ModelSpec.encoder_options`: the queue-depth policy, bounded queues, 429 with Retry-After).
"""

import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray.cloudpickle
import requests
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from serve_app.config import AppArgs, ImageLimits, ModelSpec, ZeroShotSettings
from serve_app.encoder import ClipEncoder
from serve_app.ingress import OpenAIIngress
from serve_app.preprocess import Preprocessor
from tests.conftest import METRICS_PORT, TINY_NAME, driver_handle
from tests.integration.test_api import assert_error, post

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowEncoder(ClipEncoder.func_or_class):
    """The production encoder; each forward pass also takes `pass_s`, and the rows it encoded are counted."""

    def __init__(self, spec: ModelSpec, pass_s: float) -> None:
        super().__init__(spec)
        self.rows_encoded = 0
        forward = self._core.encode_texts

        def slow(tokens):
            time.sleep(pass_s)
            self.rows_encoded += len(tokens)
            return forward(tokens)

        self._core.encode_texts = slow

    def encoded(self) -> int:
        return self.rows_encoded


def deploy(name: str, tiny_model_dir, encoder: dict, pass_s: float, batching: dict,
           request_timeout_s: float | None = 60.0) -> str:
    """An app of its own (route /name) whose encoder pool is configured as a user would: `encoder` merged
    over the pool defaults by the service's config."""
    args = AppArgs.model_validate({"model": f"local-dir:{tiny_model_dir}", "served_model_name": TINY_NAME,
                                   "torch_threads": 1, "encoder": encoder, "request_timeout_s": request_timeout_s})
    (spec,) = args.model_specs()
    options = spec.encoder_options
    encoder_app = serve.deployment(SlowEncoder).options(
        name=f"{name}-encoder", user_config=batching, health_check_period_s=1, **options
    ).bind(spec, pass_s)
    preprocessor = Preprocessor.options(ray_actor_options={"num_cpus": 0.1}).bind([spec], ImageLimits())
    app = OpenAIIngress.options(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256).bind(
        preprocessor, {TINY_NAME: encoder_app}, [spec], 64, ZeroShotSettings(), request_timeout_s=request_timeout_s
    )
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
    deadline = time.monotonic() + 120
    while serve.status().applications[name].status != "RUNNING":
        assert time.monotonic() < deadline, f"{name} did not start"
        time.sleep(0.5)
    return name


def running_replicas(app: str, deployment: str) -> int:
    return serve.status().applications[app].deployments[deployment].replica_states.get("RUNNING", 0)


class Load:
    """Closed-loop clients in threads until stopped; every status code is counted."""

    def __init__(self, url: str, body: dict, clients: int) -> None:
        self.statuses: Counter = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(url, body), daemon=True) for _ in range(clients)]

    def _client(self, url: str, body: dict) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                response = session.post(url + "/v1/embeddings", json=body, timeout=60)
                self.statuses[response.status_code] += 1

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.5)
    return time.monotonic() - start


# Fast autoscaling for a test: replicas report every 0.5 s, no upscale delay, down after 3 s without load, and
# down to no replica at all. (An encoder's `target_ongoing_requests` is refused: its policy scales on queued
# items; only its cold start, before any replica reports, counts requests with Ray's default target.)
FAST_AUTOSCALING = {"min_replicas": 0, "max_replicas": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1.0,
                    "upscale_delay_s": 0.0, "downscale_delay_s": 3.0}


def test_encoder_pool_grows_on_queued_items_and_shrinks_after_without_failures(serve_url, tiny_model_dir):
    """From no replica (min_replicas 0): many one-item requests, then a few many-item ones, each scale the pool
    up to its maximum (on items, not requests) and it shrinks back to none after each load; every request is
    answered 200, the first ones after a cold start."""
    name = deploy("scaling", tiny_model_dir, {"autoscaling_config": FAST_AUTOSCALING, "num_cpus": 0.1},
                  pass_s=0.2, batching={"max_batch_size": 4, "text_max_batch_size": 4})
    url, deployment = f"{serve_url}/{name}", f"{name}-encoder"
    try:
        wait_for(lambda: running_replicas(name, deployment) == 0, 60, "no encoder replica while idle")
        for body, clients in (({"input": "one text"}, 12), ({"input": [f"text {i}" for i in range(12)]}, 2)):
            with Load(url, body, clients) as load:
                wait_for(lambda: running_replicas(name, deployment) == 2, 90, f"scale-up under {clients} clients")
                served = sum(load.statuses.values())
                wait_for(lambda: sum(load.statuses.values()) > served + 4, 30, "requests served after scale-up")
            wait_for(lambda: running_replicas(name, deployment) == 0, 60, "scale-down after the load")
            assert set(load.statuses) == {200}, load.statuses
        # the value the policy acted on, exported from the controller
        wait_for(lambda: sample_sum(scrape(), "ray_clip_autoscaling_desired_replicas", deployment=deployment) >= 0
                 and any(s.labels.get("deployment") == deployment
                         for s in scrape().get("ray_clip_autoscaling_pending_batches", [])),
                 60, "the policy's gauges in Ray's endpoint")
    finally:
        serve.delete(name)


@pytest.fixture(scope="module")
def slow_url(serve_url, tiny_model_dir):
    """One encoder replica, two calls in flight and two queued at most, passes of one text taking 0.5 s, and
    a server deadline of 6 s (longer than the accepted part of a burst takes, shorter than 16 texts)."""
    name = deploy("slow", tiny_model_dir, {"num_cpus": 0.1, "max_ongoing_requests": 2, "max_queued_requests": 2},
                  pass_s=0.5, batching={"max_batch_size": 1, "text_max_batch_size": 1}, request_timeout_s=6.0)
    url = f"{serve_url}/{name}"
    # one request through every pool first: the tests below start from an app that has served
    assert post(url, {"input": "warm"}).status_code == 200
    yield url, driver_handle(f"{name}-encoder", app_name=name)
    serve.delete(name)


def test_overload_is_refused_at_once_with_429_and_retry_after(slow_url):
    url, _ = slow_url

    def timed_post(i: int) -> tuple[requests.Response, float]:
        start = time.monotonic()
        response = requests.post(url + "/v1/embeddings", json={"input": f"text {i}"}, timeout=60)
        return response, time.monotonic() - start

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(timed_post, range(16)))
    refused = [(r, s) for r, s in results if r.status_code == 429]
    accepted = [(r, s) for r, s in results if r.status_code == 200]
    assert refused and accepted and len(refused) + len(accepted) == len(results), [r.status_code for r, _ in results]
    for response, seconds in refused:
        assert_error(response, 429, None, "overloaded")
        assert response.headers["Retry-After"] == "1"
        assert seconds < 0.5  # answered before a single forward pass could have ended
    assert requests.get(url + "/health", timeout=30).status_code == 200
    assert post(url, {"input": "after the burst"}).status_code == 200


def test_the_server_deadline_holds_whatever_the_client_asks(slow_url):
    url, _ = slow_url
    # 16 texts at one per 0.5 s pass take 8 s, past the 6 s deadline; Ray's own timeout and disconnect watch
    # are switched off by the client's headers, the deadline is not
    response = requests.post(url + "/v1/embeddings", json={"input": [f"t{i}" for i in range(16)]},
                             headers={"x-request-timeout-seconds": "0", "x-request-disconnect-disabled": "?1"},
                             timeout=30)
    assert_error(response, 504, None, "deadline")  # a 200 would mean the 16 passes ran to the end


def settled(encoder) -> int:
    """Rows the encoder has encoded, once it has been idle for a pass's time (earlier tests' work done)."""
    last = encoder.encoded.remote().result(timeout_s=30)
    while True:
        time.sleep(1.0)
        now = encoder.encoded.remote().result(timeout_s=30)
        if now == last:
            return now
        last = now


def test_a_client_that_goes_away_stops_using_the_encoder(slow_url):
    """Three times: HAProxy once missed about half of such closes (serve_app/haproxy.py)."""
    url, encoder = slow_url
    for attempt in range(3):
        before = settled(encoder)
        with pytest.raises(requests.exceptions.ReadTimeout):  # 6 texts would take 3 s; the client leaves at 0.8 s
            requests.post(url + "/v1/embeddings", json={"input": [f"gone {attempt} {i}" for i in range(6)]},
                          timeout=0.8)
        time.sleep(3.5)  # the passes the request would have needed
        assert settled(encoder) - before <= 3, attempt  # at most those started before the client left


def scrape() -> dict[str, list]:
    """Samples of Ray's Prometheus endpoint, parsed by prometheus_client, by metric family name."""
    text = requests.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def sample_sum(families: dict, name: str, suffix: str = "", **labels: str) -> float:
    return sum(s.value for s in families.get(name, []) if s.name == name + suffix
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_operator_metrics_move_after_traffic(serve_url, slow_url):
    """Queue depth, batch fill and rejections, scraped from Ray's metrics endpoint after traffic."""
    url, _ = slow_url
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda i: requests.post(url + "/v1/embeddings", json={"input": f"m {i}"}, timeout=60), range(12)))

    def exported() -> bool:
        families = scrape()
        return (sample_sum(families, "ray_clip_batch_fill", "_count") > 0
                and sample_sum(families, "ray_clip_rejected_requests", "_total", reason="backpressure") > 0
                and "ray_clip_encoder_pending_items" in families and "ray_clip_encoder_running_items" in families)

    wait_for(exported, 60, "the service's metrics in Ray's endpoint")
    families = scrape()
    assert sample_sum(families, "ray_clip_batch_fill", "_count", model=TINY_NAME) > 0
    assert sample_sum(families, "ray_clip_batch_size", "_sum", model=TINY_NAME) > 0
