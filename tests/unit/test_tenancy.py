"""Keys, limits and their arithmetic, without a server (the Redis and PostgreSQL parts are integration tests)."""

import asyncio
import json
import os
import random
import time

import pytest

from serve_app.config import Price
from serve_app.tenancy.cli import main as clip_keys
from serve_app.tenancy.gate import price_of, prompt_token_bound, token_bound
from serve_app.tenancy.keys import KeyRing, KeysFile, hash_secret, parse_keys_file
from serve_app.tenancy.limiter import RateLimiter, Want, _verdict, openai_duration

FILE = """
defaults: {requests_per_minute: 100, tokens_per_minute: 5000}
keys:
  - id: key_acme
    name: ACME
    secrets: ["%s", "plain-secret-two"]
    requests_per_minute: 30
    credit_usd: 5
  - id: key_open
    secrets: ["sk-open"]
    tokens_per_minute: null
admin_keys:
  - id: key_ops
    secrets: ["sk-admin"]
""" % hash_secret("sk-acme")


def test_keys_file_holds_hashes_and_limits_fall_back_to_defaults():
    ring = parse_keys_file(FILE)
    acme = ring.find(b"sk-acme")
    assert acme is not None and acme.id == "key_acme" and acme.name == "ACME"
    assert ring.find(b"plain-secret-two") is acme  # rotation: one id, two secrets
    assert acme.limits.requests_per_minute == 30 and acme.limits.tokens_per_minute == 5000
    assert acme.credit_nano_usd == 5_000_000_000
    other = ring.find(b"sk-open")
    assert other.limits.requests_per_minute == 100 and other.limits.tokens_per_minute is None
    assert other.credit_nano_usd is None
    assert ring.find(b"sk-admin").admin and not acme.admin
    assert ring.find(b"sk-acme ") is None and ring.find(b"") is None and ring.find(None) is None
    # nothing held names a secret: only hashes (as bytes) are kept
    assert "sk-acme" not in repr(ring.__dict__) and "plain-secret-two" not in repr(ring.__dict__)


@pytest.mark.parametrize("text, problem", [
    ("keys: [{id: acme, secrets: [x]}]", "key_"),
    ("keys: [{id: key_a, secrets: ['sha256:12']}]", "64 hexadecimal"),
    ("keys: [{id: key_a, secrets: [x]}, {id: key_a, secrets: [y]}]", "twice"),
    ("keys: [{id: key_a, secrets: [x]}, {id: key_b, secrets: [x]}]", "two keys"),
    ("keys: [{id: key_a, secrets: ['a b']}]", "whitespace"),
    ("keys: [{id: key_a, secrets: [x], credit: 5}]", "credit"),
    ("keys: [{id: key_a, secrets: []}]", "secrets"),
    ("{not json", "not valid"),
])
def test_bad_keys_files_say_what_is_wrong_without_the_secret(text: str, problem: str):
    with pytest.raises(ValueError, match=problem) as info:
        parse_keys_file(text)
    assert "sha256:" + "0" * 64 not in str(info.value)


def test_a_keys_file_is_reloaded_when_it_changes_and_a_bad_version_keeps_the_loaded_keys(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys: [{id: key_a, secrets: [sk-a]}]")
    watched = KeysFile(str(path))
    assert watched.ring.find(b"sk-a").id == "key_a"
    assert not watched.reload_if_changed()
    path.write_text(json.dumps({"keys": [{"id": "key_b", "secrets": ["sk-b"]}]}))  # revokes a, adds b
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert watched.reload_if_changed()
    assert watched.ring.find(b"sk-a") is None and watched.ring.find(b"sk-b").id == "key_b"
    path.write_text("keys: [{id: nope}]")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert not watched.reload_if_changed()
    assert watched.ring.find(b"sk-b").id == "key_b"
    with pytest.raises(ValueError, match="cannot load"):
        KeysFile(str(tmp_path / "missing.yaml"))


def test_keys_given_as_plain_secrets_get_stable_ids():
    one = KeyRing.from_secrets((b"sk-1", b"sk-2"))
    again = KeyRing.from_secrets((b"sk-2",))
    assert one.find(b"sk-2").id == again.find(b"sk-2").id and one.find(b"sk-1").id != one.find(b"sk-2").id
    with pytest.raises(ValueError, match="twice"):
        one.merged(again)


def test_clip_keys_new_adds_an_entry_whose_secret_is_accepted(tmp_path, capsys):
    path = tmp_path / "keys.yaml"
    assert clip_keys(["new", "--id", "key_acme", "--name", "ACME", "--credit-usd", "2.5",
                      "--requests-per-minute", "60", "--add", str(path)]) == 0
    secret = capsys.readouterr().err.strip().rsplit(" ", 1)[-1]
    assert secret.startswith("sk-clip-") and secret not in path.read_text()
    key = parse_keys_file(path.read_text()).find(secret.encode())
    assert key.id == "key_acme" and key.limits.requests_per_minute == 60 and key.credit_nano_usd == 2_500_000_000


@pytest.mark.parametrize("seconds, text", [
    (0.012, "12ms"), (0.0, "0ms"), (1, "1s"), (1.5, "1.5s"), (360, "6m0s"), (59.9999, "1m0s"), (3723, "1h2m3s"),
])
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str):
    assert openai_duration(seconds) == text


@pytest.fixture(params=["memory", "redis"])
def store_url(request) -> str | None:
    """The local store (the limits library's) and the shared one (a real Redis: one Lua call a request)."""
    if request.param == "memory":
        return None
    server = request.getfixturevalue("redis_server")
    import redis

    redis.Redis.from_url(server.url).flushall()
    return server.url


def test_a_key_gets_exactly_its_requests_per_minute_then_a_retry_time(store_url):
    async def run():
        limiter = RateLimiter(store_url)
        verdicts = [await limiter.hit(30, "key_a", "requests", 1) for _ in range(31)]
        other = await limiter.hit(30, "key_b", "requests", 1)
        await limiter.close()
        return verdicts, other

    verdicts, other = asyncio.run(run())
    assert all(v.allowed for v in verdicts[:30]) and not verdicts[30].allowed and other.allowed
    assert [v.window.remaining for v in verdicts[:3]] == [29, 28, 27] and verdicts[29].window.remaining == 0
    # at worst the current minute must end and its 30 then weigh 29: 60 s + 2 s
    assert 0 < verdicts[30].retry_after_s <= 62 and verdicts[30].window.used == 30


def test_costs_are_all_or_nothing_and_a_negative_hit_gives_back(store_url):
    async def run():
        limiter = RateLimiter(store_url)
        big = await limiter.hit(100, "k", "tokens", 101)  # more than the limit: refused, nothing counted
        first = await limiter.hit(100, "k", "tokens", 80)
        over = await limiter.hit(100, "k", "tokens", 30)
        back = await limiter.hit(100, "k", "tokens", -50)
        fits = await limiter.hit(100, "k", "tokens", 30)
        # several limits in one call: all taken or none, and what is given back is given back either way
        both = await limiter.hit_many("k2", [Want("tokens", 100, 60), Want("images", 10, 4)])
        neither = await limiter.hit_many("k2", [Want("tokens", 100, 30), Want("images", 10, 7, back=0)])
        returned = await limiter.hit_many("k2", [Want("tokens", 100, 0, back=60), Want("images", 10, 5)])
        await limiter.close()
        return big, first, over, back, fits, both, neither, returned

    big, first, over, back, fits, both, neither, returned = asyncio.run(run())
    assert not big.allowed and first.allowed and first.window.remaining == 20
    assert not over.allowed and over.window.remaining == 20
    assert back.allowed and back.window.remaining == 70 and fits.allowed and fits.window.remaining == 40
    assert both[0] and both[1]["tokens"].window.remaining == 40 and both[1]["images"].window.remaining == 6
    assert not neither[0] and not neither[1]["images"].allowed
    assert neither[1]["tokens"].window.remaining == 40 and neither[1]["images"].window.remaining == 6
    assert returned[0] and returned[1]["tokens"].window.remaining == 100 and returned[1]["images"].window.remaining == 1


def test_retry_time_follows_the_sliding_window():
    # 60 in the previous minute with 30 s of it left weigh 30; 30 more now: full at 60
    verdict = _verdict(False, 60, 1, previous=60, previous_ttl=30.0, current=30, current_ttl=90.0)
    assert verdict.window.used == 60 and verdict.window.remaining == 0
    assert verdict.retry_after_s == pytest.approx(1.0)  # one request frees every second (60 a minute)
    only_current = _verdict(False, 10, 5, previous=0, previous_ttl=0.0, current=10, current_ttl=100.0)
    # nothing frees before the current window (40 s left) ends; then its 10 weigh less as it ages: 5 fit after 30 s
    assert only_current.retry_after_s == pytest.approx(40 + 30)


def test_token_bound_is_never_below_open_clips_count(tiny_model_dir):
    from serve_app.modeling import get_tokenizer
    from serve_app.preprocess import tokenize

    tokenizer = get_tokenizer(f"local-dir:{tiny_model_dir}")
    rng = random.Random(0)
    alphabet = "abc XYZ,.!?'\n\t&amp;<>é日本😀\u0958\u0085\u2028\u00a0" + "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(40))
    texts = ["", " ", "a photo of a dog.", "&amp;" * 30, "😀" * 50, "\u0958" * 40, "\u0085" * 76, "\u2028 x" * 20]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120))) for _ in range(300)]
    counts = tokenize(tokenizer, texts).token_counts
    for text, count in zip(texts, counts):
        assert token_bound(text, 77) >= count, text
    labels, templates = ["dog", "hot dog", "日本"], ("a photo of a {}.", "{}")
    prompts = [t.replace("{}", label) for label in labels for t in templates]
    assert prompt_token_bound(labels, templates, 77) == sum(token_bound(p, 77) for p in prompts)
    assert sum(tokenize(tokenizer, prompts).token_counts) <= prompt_token_bound(labels, templates, 77)


def test_prices_are_exact_integers_of_nano_dollars():
    price = Price(usd_per_million_tokens=0.02, usd_per_thousand_images=0.1)
    assert price_of(price, 7, 0) == 140  # 7 tokens at 2 cents a million
    assert price_of(price, 0, 3) == 300_000  # 3 images at 10 cents a thousand
    assert price_of(price, 1_000_000, 1000) == 20_000_000 + 100_000_000


def _tenancy(tmp_path, keys_yaml: str):
    from serve_app.config import TenancySettings
    from serve_app.tenancy.gate import Tenancy

    path = tmp_path / "keys.yaml"
    path.write_text(keys_yaml)
    settings = TenancySettings(keys_file=str(path), database_url=f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}",
                               price=Price(usd_per_million_tokens=1_000_000, usd_per_thousand_images=0))
    return Tenancy(settings, KeyRing({}))  # a token costs a dollar: credit is easy to reach


def test_requests_in_flight_hold_their_bound_against_credit(tmp_path):
    from serve_app.errors import QuotaExceeded

    async def run():
        tenancy = _tenancy(tmp_path, "keys: [{id: key_a, secrets: [sk-a], credit_usd: 10}]")
        first = tenancy.authenticate("Bearer sk-a", b"sk-a", "/v1/embeddings", "req_1")
        await tenancy.admit(first)
        await tenancy.reserve(first, tokens=6, images=0)  # holds $6 of $10
        second = tenancy.authenticate("Bearer sk-a", b"sk-a", "/v1/embeddings", "req_2")
        await tenancy.admit(second)
        with pytest.raises(QuotaExceeded, match="may cost up to"):
            await tenancy.reserve(second, tokens=6, images=0)  # $6 more would pass zero while the first runs
        first.tokens = 4  # it used 4: $4 spent, the hold released
        tenancy.finish(first, 200)
        third = tenancy.authenticate("Bearer sk-a", b"sk-a", "/v1/embeddings", "req_3")
        await tenancy.reserve(third, tokens=6, images=0)
        left = tenancy.remaining_credit(third.key)
        tenancy.finish(second, 429)  # refused by its credit, did nothing: no record
        records = list(tenancy.store._spool)
        await tenancy.close()
        return left, records

    left, records = asyncio.run(run())
    assert left == 6 * 1_000_000_000
    assert [r.request_id for _, r in records] == ["req_1"] and records[0][1].cost_nano_usd == 4 * 1_000_000_000


def test_work_done_before_a_failure_is_billed(tmp_path):
    from serve_app.tenancy import gate

    async def run():
        tenancy = _tenancy(tmp_path, "keys: [{id: key_a, secrets: [sk-a]}]")
        tenant = tenancy.authenticate("Bearer sk-a", b"sk-a", "/v1/embeddings", "req_1")
        token = gate.CURRENT.set(tenant)
        gate.used("tiny", 5, 0)  # the texts' job finished, then the images' failed: a 400
        gate.CURRENT.reset(token)
        tenancy.finish(tenant, 400)
        records = [r for _, r in tenancy.store._spool]
        await tenancy.close()
        return records

    (record,) = asyncio.run(run())
    assert (record.status, record.input_tokens, record.cost_nano_usd) == (400, 5, 5 * 1_000_000_000)


def test_one_customers_cached_labels_are_not_anothers():
    import numpy as np

    from serve_app.zero_shot import LabelCache

    cache = LabelCache(100)
    templates = ("a photo of a {}.",)
    cache.put_many("m", templates, {"secret product": np.ones(4, dtype=np.float32)}, namespace="key_a")
    assert cache.missing("m", templates, ["secret product"], namespace="key_a") == []
    assert cache.missing("m", templates, ["secret product"], namespace="key_b") == ["secret product"]
    assert cache.get_many("m", templates, ["secret product"], namespace="key_b") == {}


def test_concurrent_calls_share_round_trips_and_count_exactly(store_url):
    async def run():
        limiter = RateLimiter(store_url)
        verdicts = await asyncio.gather(*(limiter.hit(30, "key_c", "requests", 1) for _ in range(60)))
        await limiter.close()
        return verdicts

    verdicts = asyncio.run(run())
    assert sum(v.allowed for v in verdicts) == 30
    assert sorted(v.window.remaining for v in verdicts if v.allowed) == list(range(30))


def test_use_beyond_a_reservation_counts_past_the_limit(store_url):
    async def run():
        limiter = RateLimiter(store_url)
        await limiter.hit(100, "key_o", "tokens", 90)
        over = await limiter.hit_many("key_o", [Want("tokens", 100, 0, back=-50)])  # used 50 more than held
        refused = await limiter.hit(100, "key_o", "tokens", 1)
        await limiter.close()
        return over, refused

    (_, verdicts), refused = asyncio.run(run())
    assert verdicts["tokens"].window.used == 140 and verdicts["tokens"].window.remaining == 0
    assert not refused.allowed


def test_a_redis_that_lost_its_scripts_is_given_them_again(redis_server):
    import redis

    async def run():
        limiter = RateLimiter(redis_server.url)
        first = await limiter.hit_many("key_s", [Want("requests", 10, 1)])
        redis.Redis.from_url(redis_server.url).script_flush()  # as a restarted server
        again = await asyncio.gather(*(limiter.hit_many("key_s", [Want("requests", 10, 1)]) for _ in range(3)))
        degraded = limiter.degraded
        await limiter.close()
        return first, again, degraded

    first, again, degraded = asyncio.run(run())
    assert first[0] and all(fits for fits, _ in again) and not degraded
    assert sorted(v["requests"].window.remaining for _, v in again) == [6, 7, 8]
