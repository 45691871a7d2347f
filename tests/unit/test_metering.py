"""The usage and credit store on SQLite: batches, idempotency, the spool's bound, outages, credit, the Usage API.

An outage here is a real one: another connection holds SQLite's exclusive lock, so every write of the store
times out as it would against a database that stopped answering.
"""

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import create_async_engine

from serve_app.errors import Unavailable
from serve_app.tenancy.metering import METADATA, Balance, UsageRecord, UsageStore
from serve_app.tenancy.usage_api import UsagePage, UsageQuery, decode_cursor, encode_cursor

T0 = 1_700_006_400  # a UTC midnight (a whole number of days, hours and minutes)


def rec(i: int | str, key: str = "key_a", *, cost: int = 10, status: int = 200, at: float | None = None,
        tokens: int = 3, images: int = 1, model: str = "clip") -> UsageRecord:
    return UsageRecord(request_id=f"req-{i}", key_id=key, model=model, route="/v1/embeddings", input_tokens=tokens,
                       images=images, status=status, cost_nano_usd=cost,
                       created_at=T0 + 1.5 if at is None else at)


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def table(url: str, name: str, order_by: str) -> list[tuple]:
    """A table's rows, read on a connection of the test's own."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(r) for r in await conn.execute(sa.text(f"SELECT * FROM {name} ORDER BY {order_by}"))]
    finally:
        await engine.dispose()


async def request_ids(url: str) -> list[str]:
    return [r[0] for r in await table(url, "usage_records", "request_id")]


async def spend(url: str) -> dict[str, int]:
    return dict(await table(url, "credit_spend", "key_id"))


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def ids(n: int, start: int = 0) -> list[str]:
    return sorted(f"req-{i}" for i in range(start, start + n))


# ---------------------------------------------------------------- writing


def test_full_batches_are_written_at_once_and_the_rest_at_close(tmp_path: Path) -> None:
    url = url_of(tmp_path / "usage.db")

    async def main() -> list[int]:
        store = UsageStore(url, batch_size=10, flush_interval_s=60)  # only full batches flush before close
        sizes: list[int] = []
        write = store._write

        async def counting_write(rows):
            sizes.append(len(rows))
            await write(rows)

        store._write = counting_write
        await store.start()
        for i in range(30):
            store.record(rec(i))
        await until(lambda: store.spooled == 0)  # a full batch wakes the flusher
        assert await request_ids(url) == ids(30)
        for i in range(30, 35):
            store.record(rec(i))
        await asyncio.sleep(0.2)
        assert store.spooled == 5  # less than a batch waits for the interval, or close
        await store.close()
        assert store.spooled == 0 and store.healthy
        return sizes

    sizes = asyncio.run(main())
    assert sum(sizes) == 35 and max(sizes) <= 10
    assert asyncio.run(request_ids(url)) == ids(35)
    assert asyncio.run(spend(url)) == {"key_a": 350}


def test_records_are_written_every_flush_interval(tmp_path: Path) -> None:
    url = url_of(tmp_path / "usage.db")

    async def main() -> None:
        store = UsageStore(url, flush_interval_s=0.05)
        await store.start()
        store.record(rec(1))
        await until(lambda: store.spooled == 0)
        assert await request_ids(url) == ["req-1"]
        await store.close()

    asyncio.run(main())


def test_a_request_id_is_one_row_and_one_charge(tmp_path: Path) -> None:
    url = url_of(tmp_path / "usage.db")

    async def main() -> None:
        store = UsageStore(url, flush_interval_s=0.02)
        await store.start()
        store.record(rec(1, cost=7))
        store.record(rec(1, cost=7))  # twice in one batch
        await until(lambda: store.spooled == 0)
        store.record(rec(1, cost=7))  # and again in a later one
        await until(lambda: store.spooled == 0)

        # A batch whose commit succeeded but whose answer was lost is retried: still one row, one charge.
        write, calls = store._write, []

        async def committed_then_failed(rows):
            calls.append(len(rows))
            await write(rows)
            if len(calls) == 1:
                raise ConnectionResetError("the answer to COMMIT was lost")

        store._write = committed_then_failed
        store.record(rec(2, cost=5))
        await until(lambda: len(calls) >= 2 and store.spooled == 0)
        await store.close()

    asyncio.run(main())
    assert asyncio.run(request_ids(url)) == ["req-1", "req-2"]
    assert asyncio.run(spend(url)) == {"key_a": 12}


def test_the_spool_drops_its_oldest_records_when_full_and_counts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = url_of(tmp_path / "usage.db")
    store = UsageStore(url, max_spool=5)  # not started: nothing leaves the spool
    with caplog.at_level(logging.ERROR, logger="serve_app.tenancy.metering"):
        for i in range(8):
            store.record(rec(i, cost=i))
    assert (store.spooled, store.dropped) == (5, 3)
    assert store.pending_cost("key_a") == 3 + 4 + 5 + 6 + 7
    assert sum("dropping the oldest" in r.message for r in caplog.records) == 1  # at most once a minute

    async def main() -> None:
        await store.start()
        await store.close()

    asyncio.run(main())
    assert asyncio.run(request_ids(url)) == ids(5, start=3)  # the newest five
    # written, but no balances() read them yet: they still count as this replica's own spend
    assert store.pending_cost("key_a") == 3 + 4 + 5 + 6 + 7


def test_record_never_raises_and_makes_strings_safe(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = url_of(tmp_path / "usage.db")
    store = UsageStore(url)
    with caplog.at_level(logging.ERROR):
        store.record(rec(1, tokens="many"))  # type: ignore[arg-type]  # refused and logged, not raised
    assert store.spooled == 0 and "usage record refused" in caplog.text
    store.record(UsageRecord("req-2", "key_a", "bad\x00model\ud800" + "x" * 1000, "/v1/embeddings", -5, 2**70,
                             200, -1, float("nan")))

    async def main() -> None:
        await store.start()
        await store.close()

    asyncio.run(main())
    (row,) = asyncio.run(table(url, "usage_records", "request_id"))
    request_id, key_id, model, route, tokens, images, status, cost, created_at_us = row
    assert model.startswith("badmodel?x") and len(model) <= 256
    assert (tokens, images, cost) == (0, 2**63 - 1, 0)
    assert abs(created_at_us / 1e6 - time.time()) < 60


# ---------------------------------------------------------------- outages


def test_an_outage_keeps_every_record_and_writes_each_once_after_it(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    url = url_of(path)

    async def main() -> None:
        store = UsageStore(url, batch_size=20, flush_interval_s=0.02, timeout_s=0.2)
        await store.start()
        for i in range(30):
            store.record(rec(i, key="key_a" if i % 3 else "key_b"))
        await until(lambda: store.spooled == 0)

        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # the database stops answering
        for i in range(30, 100):
            store.record(rec(i, key="key_a" if i % 3 else "key_b"))
        await until(lambda: not store.healthy)
        with pytest.raises(Unavailable):
            await store.balances()
        await asyncio.sleep(0.5)  # several failed flushes
        assert store.spooled == 70 and store.dropped == 0
        # the 70 spooled, and the 30 written before, which no balances() has read (the failed one forgets nothing)
        assert store.pending_cost("key_a") + store.pending_cost("key_b") == 700 + 300
        blocker.rollback()
        blocker.close()

        await until(lambda: store.spooled == 0 and store.healthy, timeout_s=10)
        assert await store.balances() == {"key_a": Balance(0, 660), "key_b": Balance(0, 340)}
        await store.close()

    asyncio.run(main())
    assert asyncio.run(request_ids(url)) == ids(100)


def test_a_database_unreachable_at_start_is_migrated_and_written_later(tmp_path: Path) -> None:
    directory = tmp_path / "not-yet"
    url = url_of(directory / "usage.db")  # SQLite cannot open a file in a directory that does not exist

    async def main() -> None:
        store = UsageStore(url, flush_interval_s=0.02, timeout_s=0.5)
        await store.start()  # does not fail
        assert not store.healthy
        store.record(rec(1))
        await asyncio.sleep(0.2)
        assert store.spooled == 1
        directory.mkdir()
        await until(lambda: store.spooled == 0 and store.healthy, timeout_s=10)
        await store.close()

    asyncio.run(main())
    assert asyncio.run(request_ids(url)) == ["req-1"]


def test_close_waits_a_bounded_time_for_a_database_that_is_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.db"

    async def main() -> float:
        store = UsageStore(url_of(path), flush_interval_s=60, timeout_s=0.2)
        await store.start()
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        store.record(rec(1))
        began = time.monotonic()
        with caplog.at_level(logging.ERROR):
            await store.close(timeout_s=0.5)
        blocker.rollback()
        blocker.close()
        assert store.spooled == 1 and "closed with 1 records unwritten" in caplog.text
        return time.monotonic() - began

    assert asyncio.run(main()) < 2.0


# ---------------------------------------------------------------- schema


def test_the_migrations_build_the_tables_the_code_uses_and_run_once(tmp_path: Path) -> None:
    import serve_app.batch.records  # noqa: F401  (registers the batch tables on METADATA)

    assert {"usage_records", "credit_spend", "credit_grants", "batch_files", "batches"} <= set(METADATA.tables)
    url = url_of(tmp_path / "usage.db")

    async def main() -> list:
        stores = [UsageStore(url) for _ in range(3)]
        await asyncio.gather(*(s.start() for s in stores))  # at once, on one file
        assert all(s.healthy for s in stores)
        await asyncio.gather(*(s.close() for s in stores))
        engine = create_async_engine(url)
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"version_table": "usage_alembic_version"}), METADATA))
            versions = (await conn.execute(sa.text("SELECT version_num FROM usage_alembic_version"))).all()
        await engine.dispose()
        assert versions == [("0002",)]
        return diff

    assert asyncio.run(main()) == []


# ---------------------------------------------------------------- credit


def test_grants_and_balances(tmp_path: Path) -> None:
    async def main() -> None:
        store = UsageStore(url_of(tmp_path / "usage.db"), flush_interval_s=60)
        await store.start()
        assert await store.balances() == {}
        assert await store.grant("key_a", 1_000_000, note="welcome") == 1_000_000
        assert await store.grant("key_a", 500_000) == 1_500_000
        assert await store.grant("key_a", -100_000, note="correction") == 1_400_000
        store.record(rec(1, "key_a", cost=30))
        store.record(rec(2, "key_b", cost=20))
        store.record(rec(3, "key_b", cost=0, status=429))
        assert (store.pending_cost("key_a"), store.pending_cost("key_b"), store.pending_cost("key_c")) == (30, 20, 0)
        assert await store.balances() == {"key_a": Balance(1_400_000, 0)}  # nothing written yet
        await store.flush()
        # written since the last read of the balances: still counted here, so no view is ever below the truth
        assert (store.pending_cost("key_a"), store.pending_cost("key_b")) == (30, 20)
        balances = await store.balances()
        assert store.pending_cost("key_a") == store.pending_cost("key_b") == 0
        assert balances == {"key_a": Balance(1_400_000, 30), "key_b": Balance(0, 20)}
        assert balances["key_a"].remaining_nano_usd == 1_399_970
        await store.close()

    asyncio.run(main())


# ---------------------------------------------------------------- the Usage API


def with_store(url: str, work):
    """Runs `work(store)` on a started store of `url` (a store belongs to the event loop that started it)."""

    async def main():
        store = UsageStore(url, flush_interval_s=60)
        await store.start()
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(main())


def page(url: str, **params) -> UsagePage:
    params.setdefault("end_time", None)
    params.setdefault("group_by", [])
    params.setdefault("limit", None)
    params.setdefault("page", None)
    return with_store(url, lambda store: store.usage_buckets(**params))


@pytest.fixture
def usage_db(tmp_path: Path) -> str:
    """A database holding: key_a/clip at minutes 0, 0, 2 (and a 429 at minute 2), key_b/clip at minute 0,
    key_b/other at minute 3 and on day 2; each answered request 3 tokens and 1 image."""
    url = url_of(tmp_path / "usage.db")
    records = [
        rec(1, "key_a", at=T0 + 1), rec(2, "key_a", at=T0 + 59.9), rec(3, "key_a", at=T0 + 120),
        rec(4, "key_a", at=T0 + 121, status=429, tokens=0, images=0, cost=0),
        rec(5, "key_b", at=T0 + 30), rec(6, "key_b", at=T0 + 200, model="other"),
        rec(7, "key_b", at=T0 + 2 * 86400 + 5, model="other"),
    ]

    async def fill(store: UsageStore) -> None:
        for r in records:
            store.record(r)

    with_store(url, fill)  # close writes them
    return url


def totals(p: UsagePage) -> list[tuple[int, int, int]]:
    """Per bucket: its start (minutes from T0), requests, tokens (each bucket has one result or none)."""
    out = []
    for bucket in p.data:
        assert bucket.end_time - bucket.start_time in (60, 3600, 86400)
        assert len(bucket.results) <= 1
        r = bucket.results[0] if bucket.results else None
        out.append(((bucket.start_time - T0) // 60, r.num_model_requests if r else 0, r.input_tokens if r else 0))
    return out


def test_usage_by_minute_counts_answered_requests_in_every_bucket(usage_db: str) -> None:
    p = page(usage_db, start_time=T0, end_time=T0 + 5 * 60, bucket_width="1m")
    # Minute 2 holds one 200 and one 429: only the 200 counts. Minutes 1 and 4 are empty and present.
    assert totals(p) == [(0, 3, 9), (1, 0, 0), (2, 1, 3), (3, 1, 3), (4, 0, 0)]
    assert (p.object, p.has_more, p.next_page) == ("page", False, None)
    first = p.data[0].results[0]
    assert (first.object, first.images, first.api_key_id, first.model, first.project_id) == (
        "organization.usage.embeddings.result", 3, None, None, None)


def test_usage_grouped_by_key_and_model(usage_db: str) -> None:
    p = page(usage_db, start_time=T0, end_time=T0 + 3600, bucket_width="1h", group_by=["api_key_id", "model"])
    assert len(p.data) == 1
    got = [(r.api_key_id, r.model, r.num_model_requests, r.input_tokens, r.images) for r in p.data[0].results]
    assert got == [("key_a", "clip", 3, 9, 3), ("key_b", "clip", 1, 3, 1), ("key_b", "other", 1, 3, 1)]
    by_model = page(usage_db, start_time=T0, end_time=T0 + 3600, bucket_width="1h", group_by=["model"])
    assert [(r.api_key_id, r.model, r.num_model_requests) for r in by_model.data[0].results] == [
        (None, "clip", 4), (None, "other", 1)]


def test_usage_by_day_with_the_default_limit_and_key_scope(usage_db: str) -> None:
    p = page(usage_db, start_time=T0, end_time=T0 + 30 * 86400, bucket_width="1d")
    assert len(p.data) == 7 and p.has_more  # OpenAI's default for 1d
    assert [b.results[0].num_model_requests if b.results else 0 for b in p.data] == [5, 0, 1, 0, 0, 0, 0]
    scoped = page(usage_db, start_time=T0, end_time=T0 + 3 * 86400, bucket_width="1d", key_ids=["key_b"])
    assert [b.results[0].num_model_requests if b.results else 0 for b in scoped.data] == [2, 0, 1]
    nobody = page(usage_db, start_time=T0, end_time=T0 + 86400, bucket_width="1d", key_ids=[])
    assert nobody.data[0].results == []
    query = UsageQuery(start_time=T0, end_time=T0 + 86400, api_key_ids=["key_a", "key_b"], models=["other"])
    filtered = with_store(usage_db, lambda store: store.usage(query, key_ids=["key_b", "key_c"]))
    assert filtered.data[0].results[0].num_model_requests == 1


def test_usage_pages_follow_next_page_to_the_end(usage_db: str) -> None:
    whole = page(usage_db, start_time=T0, end_time=T0 + 7 * 60, bucket_width="1m")
    pages, cursor = [], None
    while True:
        p = page(usage_db, start_time=T0, end_time=T0 + 7 * 60, bucket_width="1m", limit=3, page=cursor)
        pages.append(p)
        if not p.has_more:
            break
        cursor = p.next_page
        assert cursor is not None and cursor.startswith("page_")
    assert [len(p.data) for p in pages] == [3, 3, 1]
    assert pages[-1].next_page is None
    assert [b for p in pages for b in p.data] == whole.data


def test_usage_without_end_time_runs_to_now(usage_db: str) -> None:
    now = int(time.time())
    p = page(usage_db, start_time=now - 3 * 60 - 1, bucket_width="1m")
    assert len(p.data) == 4 and not p.has_more
    assert p.data[-1].start_time <= now < p.data[-1].end_time
    hours = page(usage_db, start_time=T0, bucket_width="1h")  # long ago: the default limit applies
    assert len(hours.data) == 24 and hours.has_more


@pytest.mark.parametrize(("width", "default", "maximum"), [("1m", 60, 1440), ("1h", 24, 168), ("1d", 7, 31)])
def test_usage_limits_are_openais(width: str, default: int, maximum: int) -> None:
    assert UsageQuery(start_time=T0, bucket_width=width).limit == default
    assert UsageQuery(start_time=T0, bucket_width=width, limit=maximum).limit == maximum
    with pytest.raises(ValidationError, match=f"at most {maximum}"):
        UsageQuery(start_time=T0, bucket_width=width, limit=maximum + 1)
    with pytest.raises(ValidationError):
        UsageQuery(start_time=T0, bucket_width=width, limit=0)


def test_usage_query_parameters_are_validated() -> None:
    assert UsageQuery(start_time=T0).bucket_width == "1d"
    bad = [
        {}, {"start_time": -1}, {"start_time": T0, "end_time": T0}, {"start_time": T0, "bucket_width": "1w"},
        {"start_time": T0, "group_by": ["project_id"]}, {"start_time": T0, "project_ids": ["proj_1"]},
        {"start_time": T0, "page": "page_garbage"}, {"start_time": T0, "page": "nonsense"},
        {"start_time": T0, "page": encode_cursor(T0 + 1, 60, T0 + 61), "bucket_width": "1m"},  # another query's
        {"start_time": T0, "page": encode_cursor(T0, 60, T0 + 30), "bucket_width": "1m"},  # not on a bucket
        {"start_time": "yesterday"},
    ]
    for params in bad:
        with pytest.raises(ValidationError):
            UsageQuery.model_validate(params)


def test_usage_query_from_url_parameters() -> None:
    # As the openai SDK sends lists (brackets), as repeated keys, and numbers as strings.
    q = UsageQuery.from_query_items([
        ("start_time", str(T0)), ("bucket_width", "1m"), ("group_by[]", "model"), ("group_by[]", "api_key_id"),
        ("api_key_ids", "key_a"), ("api_key_ids", "key_b"), ("limit", "5"), ("ignored", "x"),
    ])
    assert (q.start_time, q.bucket_width, q.group_by, q.api_key_ids, q.limit) == (
        T0, "1m", ["model", "api_key_id"], ["key_a", "key_b"], 5)
    assert decode_cursor(encode_cursor(T0, 60, T0 + 120), T0, 60) == T0 + 120


def test_the_database_methods_need_a_started_store(tmp_path: Path) -> None:
    store = UsageStore(url_of(tmp_path / "usage.db"))
    with pytest.raises(RuntimeError):
        asyncio.run(store.balances())
    with pytest.raises(ValueError):
        UsageStore("mysql+aiomysql://x/y")


def test_usage_pages_parse_as_the_openai_sdks_type(usage_db: str) -> None:
    from openai.types.admin.organization.usage_embeddings_response import UsageEmbeddingsResponse

    p = page(usage_db, start_time=T0, end_time=T0 + 3 * 60, bucket_width="1m", group_by=["api_key_id"], limit=2)
    sdk = UsageEmbeddingsResponse.model_validate_json(p.model_dump_json())
    assert (sdk.object, sdk.has_more, sdk.next_page) == ("page", True, p.next_page)
    first = sdk.data[0].results[0]
    assert (first.object, first.api_key_id, first.num_model_requests, first.input_tokens) == (
        "organization.usage.embeddings.result", "key_a", 2, 6)
    assert first.images == 2  # type: ignore[attr-defined]  # our extension, kept as an extra field
    assert list(p.model_dump()) == ["object", "data", "has_more", "next_page"]
    assert list(p.data[0].results[0].model_dump()) == [
        "object", "input_tokens", "num_model_requests", "project_id", "user_id", "api_key_id", "model", "images"]
