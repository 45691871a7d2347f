"""Keys as customers over real HTTP: two ingress replicas sharing a real Redis for rate limits and a real
PostgreSQL for usage and credit (both started by the test session: tests/services.py), the official openai SDK.

The app is the one-process layout with two replicas (each is an ingress: what matters here is two processes
counting one key's limits). Each test uses its own key, so their counters do not mix.
"""

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import requests
import yaml

from tests.conftest import TINY_NAME, b64, encode, random_image
from tests.integration.test_api import assert_error
from tests.integration.test_scaling import sample_sum, scrape, wait_for

SECRETS = {name: f"sk-test-{name}-9d1e" for name in
           ("rpm", "cost", "credit", "sdk", "usage", "down", "pg", "admin", "new", "revoked")}
GIVE_BACK_S = 1.5  # a reservation's excess is back in Redis within a second (Tenancy._watch_backs)
PRICE_PER_TOKEN_USD = 1e-6  # 1 USD a million tokens: a few captions spend the tiny credit below


def keys_file_text(extra: list[dict] | None = None, without: tuple[str, ...] = ()) -> str:
    keys = [
        {"id": "key_rpm", "secrets": [SECRETS["rpm"]], "requests_per_minute": 30},
        {"id": "key_cost", "secrets": [SECRETS["cost"]], "tokens_per_minute": 1000, "images_per_minute": 10},
        # 20 tokens' worth: the first request or two spend it
        {"id": "key_credit", "secrets": [SECRETS["credit"]], "credit_usd": 20 * PRICE_PER_TOKEN_USD},
        {"id": "key_sdk", "secrets": [SECRETS["sdk"]], "requests_per_minute": 100},
        {"id": "key_usage", "name": "usage sums", "secrets": [SECRETS["usage"]]},
        {"id": "key_down", "secrets": [SECRETS["down"]], "requests_per_minute": 40},
        {"id": "key_pg", "secrets": [SECRETS["pg"]]},
        {"id": "key_revoked", "secrets": [SECRETS["revoked"]]},
    ]
    keys = [k for k in keys if k["id"] not in without] + (extra or [])
    return yaml.safe_dump({"defaults": {"requests_per_minute": 6000}, "keys": keys,
                           "admin_keys": [{"id": "key_admin", "secrets": [SECRETS["admin"]]}]})


@pytest.fixture(scope="module")
def keys_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tenancy") / "keys.yaml"
    path.write_text(keys_file_text())
    return path


@pytest.fixture(scope="module")
def tenants_url(serve_url, tiny_model_dir: Path, keys_path: Path, redis_server, postgres_server):
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppArgs

    args = AppArgs.model_validate({
        "model": f"local-dir:{tiny_model_dir}", "served_model_name": TINY_NAME, "device": "cpu",
        "layout": "one-process", "torch_threads": 1,
        "encoder": {"num_replicas": 2, "num_cpus": 0.25},
        "tenancy": {
            "keys_file": str(keys_path), "redis_url": redis_server.url, "database_url": postgres_server.url,
            "price": {"usd_per_million_tokens": PRICE_PER_TOKEN_USD * 1e6, "usd_per_thousand_images": 1.0},
        },
    })
    serve.run(build_app(args), name="tenants", route_prefix="/tenants", blocking=False)
    url = serve_url + "/tenants"
    wait_for(lambda: _live(url), 180, "the tenants app")
    # both replicas answer with the shared store
    wait_for(lambda: post(url, "usage", "warm up").status_code == 200, 60, "a first answer")
    yield url
    serve.delete("tenants")


def _live(url: str) -> bool:
    try:
        return requests.get(url + "/livez", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def post(url: str, key: str, payload, route: str = "/v1/embeddings") -> requests.Response:
    body = payload if isinstance(payload, dict) else {"input": payload}
    return requests.post(url + route, json=body, headers={"Authorization": f"Bearer {SECRETS[key]}"}, timeout=60)


def burst(url: str, key: str, count: int, workers: int = 8) -> list[requests.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: post(url, key, f"caption {i}"), range(count)))


def test_requests_per_minute_are_shared_by_the_replicas(tenants_url):
    responses = burst(tenants_url, "rpm", 60)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and 29 <= statuses[200] <= 31, statuses
    ok = [r for r in responses if r.status_code == 200]
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining[0] <= 1 and remaining[-1] >= 28  # counted down across both replicas
    assert all(r.headers["x-ratelimit-limit-requests"] == "30" for r in ok)
    refused = next(r for r in responses if r.status_code == 429)
    error = assert_error(refused, 429, None, "rate limit reached for key_rpm on requests per min", "rate_limit_exceeded")
    assert error["type"] == "requests" and "Limit 30" in error["message"] and "try again in" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1 and int(refused.headers["retry-after-ms"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_and_images_charge_what_the_request_used(tenants_url, reference):
    image = b64(encode(random_image(seed=3)))
    payload = {"input": [{"image": image}, "a photo of a cat", {"image": image}, "two dogs", {"image": image}]}
    first = post(tenants_url, "cost", payload)
    assert first.status_code == 200, first.text
    tokens = first.json()["usage"]["prompt_tokens"]
    assert tokens == int((reference[2](["a photo of a cat", "two dogs"]) != 0).sum())  # as open_clip counts
    assert first.headers["x-ratelimit-limit-tokens"] == "1000" and first.headers["x-ratelimit-limit-images"] == "10"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 1000 - tokens
    assert int(first.headers["x-ratelimit-remaining-images"]) == 10 - 3
    # what a request held beyond its use returns to the shared counters with the key's next request on the same
    # replica, or within a second: the next request may land on the other replica
    time.sleep(GIVE_BACK_S)
    second = post(tenants_url, "cost", payload)
    assert int(second.headers["x-ratelimit-remaining-images"]) == 10 - 6
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 1000 - 2 * tokens
    time.sleep(GIVE_BACK_S)
    over = post(tenants_url, "cost", {"input": [{"image": image}] * 5})  # 11 images > 10
    error = assert_error(over, 429, None, "images per min", "rate_limit_exceeded")
    assert error["type"] == "images" and "Requested 5" in error["message"]
    # refused whole: its images were not counted, and tokens were not taken either
    assert int(over.headers["x-ratelimit-remaining-images"]) == 4
    time.sleep(GIVE_BACK_S)
    # an image that does not decode: a 400 that did no work costs nothing (work done before a failure is billed:
    # tests/unit/test_tenancy.py)
    bad = post(tenants_url, "cost", {"input": [{"image": "bm90IGFuIGltYWdl"}]})
    assert bad.status_code == 400 and int(bad.headers["x-ratelimit-remaining-images"]) == 4
    assert int(bad.headers["x-ratelimit-remaining-tokens"]) == 1000 - 2 * tokens


def test_spent_credit_is_insufficient_quota_and_the_sdk_does_not_retry(tenants_url):
    answers = []
    for i in range(6):
        answers.append(post(tenants_url, "credit", f"a photo of number {i}"))
        if answers[-1].status_code == 429:
            break
        time.sleep(1.5)  # the other replica sees this one's spend within a flush and a refresh
    assert answers[0].status_code == 200 and answers[-1].status_code == 429, [a.text for a in answers]
    error = assert_error(answers[-1], 429, None, "quota", "insufficient_quota")
    assert error["type"] == "insufficient_quota" and answers[-1].headers["x-should-retry"] == "false"
    sent = []
    client = openai.OpenAI(base_url=tenants_url + "/v1", api_key=SECRETS["credit"], max_retries=2,
                           http_client=httpx.Client(event_hooks={"request": [sent.append]}))
    with pytest.raises(openai.RateLimitError) as info:
        client.embeddings.create(model=TINY_NAME, input=f"a photo of number {len(answers) - 1}")  # as refused
    assert info.value.code == "insufficient_quota" and len(sent) == 1


def test_the_sdk_sees_the_rate_limit_headers(tenants_url):
    client = openai.OpenAI(base_url=tenants_url + "/v1", api_key=SECRETS["sdk"])
    raw = client.with_raw_response.embeddings.create(model=TINY_NAME, input=["a", "b"])
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) in (98, 99)
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert len(raw.parse().data) == 2


def _usage(url: str, key: str = "admin", **params) -> requests.Response:
    return requests.get(url + "/v1/organization/usage/embeddings", params=params,
                        headers={"Authorization": f"Bearer {SECRETS[key]}"}, timeout=30)


def test_usage_api_sums_what_the_clients_sent(tenants_url):
    start = int(time.time()) - 1
    tokens = 0
    for i in range(7):
        response = post(tenants_url, "usage", ["a dog", f"the cat number {i}"])
        tokens += response.json()["usage"]["prompt_tokens"]
    image = b64(encode(random_image(seed=4)))
    post(tenants_url, "usage", {"input": [{"image": image}, {"image": image}]})

    def summed() -> dict:
        page = _usage(tenants_url, start_time=start, bucket_width="1d", group_by=["api_key_id", "model"]).json()
        return {(r["api_key_id"], r["model"]): r for b in page["data"] for r in b["results"]}

    wait_for(lambda: summed().get(("key_usage", TINY_NAME), {}).get("num_model_requests") == 8, 20,
             "the usage records of key_usage")
    row = summed()[("key_usage", TINY_NAME)]
    assert row["input_tokens"] == tokens and row["images"] == 2
    assert row["object"] == "organization.usage.embeddings.result"
    assert_error(_usage(tenants_url, "usage", start_time=start), 403, None, "admin", "insufficient_permissions")
    listing = requests.get(tenants_url + "/v1/organization/api_keys", timeout=30,
                           headers={"Authorization": f"Bearer {SECRETS['admin']}"}).json()
    ids = {k["id"]: k for k in listing["data"]}
    assert ids["key_usage"]["name"] == "usage sums" and ids["key_rpm"]["requests_per_minute"] == 30
    assert all(s not in json.dumps(listing) for s in SECRETS.values()) and "sha256" not in json.dumps(listing)
    # an admin key reaches nothing else
    assert post(tenants_url, "admin", "x").status_code == 403


def test_credit_top_up_by_an_admin(tenants_url):
    def top_up(amount: float) -> requests.Response:
        return requests.post(tenants_url + "/v1/organization/api_keys/key_credit/credit", timeout=30,
                             json={"amount_usd": amount, "note": "test"},
                             headers={"Authorization": f"Bearer {SECRETS['admin']}"})

    wait_for(lambda: post(tenants_url, "credit", "spend it").status_code == 429, 30, "key_credit spent")
    answer = top_up(1.0)
    assert answer.status_code == 200 and answer.json()["credit_remaining_usd"] > 0.99
    wait_for(lambda: all(post(tenants_url, "credit", "again").status_code == 200 for _ in range(4)), 10,
             "the top-up on both replicas")
    assert requests.post(tenants_url + "/v1/organization/api_keys/key_nobody/credit", json={"amount_usd": 1},
                         headers={"Authorization": f"Bearer {SECRETS['admin']}"}, timeout=30).status_code == 404


def test_keys_file_edits_apply_on_every_replica_without_a_restart(tenants_url, keys_path):
    assert post(tenants_url, "new", "x").status_code == 401
    assert post(tenants_url, "revoked", "x").status_code == 200
    keys_path.write_text(keys_file_text(extra=[{"id": "key_new", "secrets": [SECRETS["new"]]}],
                                        without=("key_revoked",)))
    changed = time.monotonic()

    def applied() -> bool:  # several answers, so both replicas have had their say
        return all(post(tenants_url, "revoked", "x").status_code == 401 and
                   post(tenants_url, "new", "x").status_code == 200 for _ in range(6))

    wait_for(applied, 10, "the edited keys file on both replicas")
    assert time.monotonic() - changed < 10


def test_redis_down_limits_locally_without_errors_and_recovers(tenants_url, redis_server):
    redis_server.stop()
    try:
        responses = burst(tenants_url, "down", 60)
        statuses = Counter(r.status_code for r in responses)
        # each replica counts 40 / 2 replicas: never more than the shared limit, and both replicas answered
        assert set(statuses) <= {200, 429} and 16 <= statuses[200] <= 40, statuses
        wait_for(lambda: sample_sum(scrape(), "ray_clip_rate_limit_store_degraded", application="tenants") >= 1,
                 30, "the degraded metric")
    finally:
        redis_server.start()
    # back to the shared counters within the probe interval: a fresh minute of key_down is counted in Redis
    wait_for(lambda: sample_sum(scrape(), "ray_clip_rate_limit_store_degraded", application="tenants") == 0, 30,
             "the degraded metric back to 0")
    import redis

    client = redis.Redis.from_url(redis_server.url)
    before = len(client.keys("clip*"))
    assert post(tenants_url, "down", "x").status_code in (200, 429)
    assert len(client.keys("clip*")) > before


def test_postgres_restart_loses_no_usage_record(tenants_url, postgres_server):
    start = int(time.time()) - 1
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, tenants_url, "pg", f"row {i}") for i in range(40)]
        time.sleep(0.5)
        postgres_server.restart()
        futures += [pool.submit(post, tenants_url, "pg", f"row {i}") for i in range(40, 60)]
        answered = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in answered), Counter(r.status_code for r in answered)

    def recorded() -> int:
        page = _usage(tenants_url, start_time=start, bucket_width="1d", group_by=["api_key_id"],
                      api_key_ids=["key_pg"]).json()
        return sum(r["num_model_requests"] for b in page.get("data", []) for r in b["results"])

    wait_for(lambda: recorded() >= len(answered), 60, "every answered request's record")
    time.sleep(2)
    assert recorded() == len(answered)  # exactly one record each


def test_no_secret_in_the_replica_logs(tenants_url):
    import ray

    log_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    text = "".join(p.read_text(errors="replace") for p in log_dir.glob("*") if p.is_file()
                   and p.stat().st_size < 50_000_000)
    assert all(secret not in text for secret in SECRETS.values())
    assert os.environ.get("CLIP_KEYS_FILE") is None
