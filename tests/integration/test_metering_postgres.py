"""The usage and credit store against a real PostgreSQL: replicas migrating at once, a restart of the server under
load (every record written exactly once, every charge once), and the Usage API's buckets equal to what was recorded.

Each test works in a database of its own on the session's server (the `clip` role may create databases).
"""

import asyncio
import json
import random
import secrets
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from serve_app.tenancy.metering import METADATA, VERSION_TABLE, Balance, UsageRecord, UsageStore
from serve_app.tenancy.usage_api import UsagePage
from tests.services import PostgresServer

T0 = 1_700_006_400  # a UTC midnight
ROOT = Path(__file__).resolve().parents[2]
# One ingress replica's start: import, wait for the common moment, start the store, report whether it migrated.
REPLICA = """
import asyncio, json, sys, time
from serve_app.tenancy.metering import UsageStore
async def main():
    store = UsageStore(sys.argv[1], timeout_s=20)
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    await store.start()
    print(json.dumps({"healthy": store.healthy}))
    await store.close()
asyncio.run(main())
"""


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"metering_{secrets.token_hex(4)}"

    async def as_clip(statement: str) -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=postgres_server.port, user="clip", password="clip",
                                     database="clip", timeout=10)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(as_clip(f'CREATE DATABASE "{name}"'))
    yield postgres_server.url.rsplit("/", 1)[0] + "/" + name
    asyncio.run(as_clip(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def fetch(url: str, statement: str) -> list[tuple]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(r) for r in await conn.execute(sa.text(statement))]
    finally:
        await engine.dispose()


async def until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def test_replica_processes_starting_at_once_migrate_the_database_once(pg_url: str) -> None:
    """Replicas are processes: their upgrades meet only in PostgreSQL, where the advisory lock orders them."""
    start_at = str(time.time() + 4)  # after every interpreter has imported SQLAlchemy and alembic
    replicas = [subprocess.Popen([sys.executable, "-c", REPLICA, pg_url, start_at], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(3)]
    reports = [replica.communicate(timeout=60) for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0, 0], [err[-2000:] for _, err in reports]
    assert [json.loads(out) for out, _ in reports] == [{"healthy": True}] * 3, [err[-2000:] for _, err in reports]
    assert asyncio.run(fetch(pg_url, f"SELECT version_num FROM {VERSION_TABLE}")) == [("0002",)]


def test_stores_of_one_process_starting_at_once_migrate_the_database_once(pg_url: str) -> None:
    async def main() -> None:
        stores = [UsageStore(pg_url) for _ in range(4)]
        await asyncio.gather(*(s.start() for s in stores))
        assert all(s.healthy for s in stores)
        await asyncio.gather(*(s.close() for s in stores))
        assert await fetch(pg_url, f"SELECT version_num FROM {VERSION_TABLE}") == [("0002",)]
        engine = create_async_engine(pg_url)
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"version_table": VERSION_TABLE}), METADATA))
        await engine.dispose()
        assert diff == []

    asyncio.run(main())


def test_a_restart_under_load_writes_every_record_and_charge_exactly_once(
    pg_url: str, postgres_server: PostgresServer
) -> None:
    keys = ["key_a", "key_b", "key_c"]
    recorded: dict[str, UsageRecord] = {}

    async def produce(store: UsageStore, replica: int, stop: asyncio.Event, unhealthy: list[bool]) -> None:
        n = 0
        while not stop.is_set():
            for _ in range(20):
                n += 1
                r = UsageRecord(f"r{replica}-{n}", keys[n % 3], "clip", "/v1/embeddings", 5, n % 2, 200,
                                cost_nano_usd=n % 7, created_at=time.time())
                recorded[r.request_id] = r
                store.record(r)
                if n % 50 == 0:
                    store.record(r)  # a retried request: the same id again
            unhealthy.append(not store.healthy)
            await asyncio.sleep(0.01)

    async def main() -> None:
        stores = [UsageStore(pg_url, batch_size=50, flush_interval_s=0.02, timeout_s=2) for _ in range(2)]
        await asyncio.gather(*(s.start() for s in stores))
        await stores[0].grant("key_a", 1_000, note="before the restart")
        stop, unhealthy = asyncio.Event(), []
        producers = [asyncio.create_task(produce(s, i, stop, unhealthy)) for i, s in enumerate(stores)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(postgres_server.restart)  # both replicas' connections die under load
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*producers)
        await until(lambda: all(s.spooled == 0 and s.healthy for s in stores), timeout_s=30)
        assert any(unhealthy), "no flush failed: the restart was not seen under load"
        assert [s.dropped for s in stores] == [0, 0]
        for store in stores:
            await store.balances()
        assert all(s.pending_cost(k) == 0 for s in stores for k in keys)

        rows = await fetch(pg_url, "SELECT request_id, key_id, cost_nano_usd FROM usage_records")
        assert len(rows) == len(recorded) > 400
        assert {r[0] for r in rows} == set(recorded)
        expected_spend = Counter()
        for r in recorded.values():
            expected_spend[r.key_id] += r.cost_nano_usd
        balances = await stores[1].balances()
        assert balances == {k: Balance(1_000 if k == "key_a" else 0, expected_spend[k]) for k in keys}
        await asyncio.gather(*(s.close() for s in stores))

    asyncio.run(main())


def test_usage_buckets_on_postgres_equal_what_was_recorded(pg_url: str) -> None:
    rng = random.Random(7)
    records = [
        UsageRecord(f"u{i}", rng.choice(["key_a", "key_b"]), rng.choice(["clip", "clip-b"]), "/v1/embeddings",
                    rng.randrange(1, 50), rng.randrange(0, 3), rng.choice([200, 200, 200, 400, 429, 500]),
                    cost_nano_usd=rng.randrange(0, 100), created_at=T0 + rng.uniform(0, 3 * 86400))
        for i in range(600)
    ]
    records.append(records[0])  # the same id twice in one batch: one row

    def expected(width: int, group_by: list[str], end: int) -> dict[tuple, tuple[int, int, int]]:
        out: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
        for r in records[:-1]:
            if 200 <= r.status < 300 and r.created_at < end:
                start = T0 + int((r.created_at - T0) // width) * width
                group = tuple(r.key_id if g == "api_key_id" else r.model for g in group_by)
                totals = out[(start, *group)]
                totals[0] += r.input_tokens
                totals[1] += 1
                totals[2] += r.images
        return {k: tuple(v) for k, v in out.items()}

    def observed(pages: list[UsagePage], group_by: list[str]) -> dict[tuple, tuple[int, int, int]]:
        out = {}
        for p in pages:
            for bucket in p.data:
                for r in bucket.results:
                    group = tuple(r.api_key_id if g == "api_key_id" else r.model for g in group_by)
                    out[(bucket.start_time, *group)] = (r.input_tokens, r.num_model_requests, r.images)
        return out

    async def all_pages(store: UsageStore, **params) -> list[UsagePage]:
        pages, cursor = [], None
        while True:
            p = await store.usage_buckets(page=cursor, **params)
            pages.append(p)
            starts = [b.start_time for b in p.data]
            assert starts == sorted(starts)
            if not p.has_more:
                return pages
            cursor = p.next_page

    async def main() -> None:
        store = UsageStore(pg_url, flush_interval_s=60)
        await store.start()
        for r in records:
            store.record(r)
        await store.flush()
        assert await fetch(pg_url, "SELECT count(*) FROM usage_records") == [(600,)]
        end = T0 + 2 * 86400 + 3600
        for width_name, width, limit in (("1d", 86400, None), ("1h", 3600, 24), ("1m", 60, 1440)):
            for group_by in ([], ["api_key_id"], ["model", "api_key_id"]):
                pages = await all_pages(store, start_time=T0, end_time=end, bucket_width=width_name,
                                        group_by=group_by, limit=limit)
                assert sum(len(p.data) for p in pages) == -(-(end - T0) // width)  # every bucket, empty ones too
                assert observed(pages, group_by) == expected(width, group_by, end), (width_name, group_by)
        spent = Counter()
        for r in records[:-1]:
            spent[r.key_id] += r.cost_nano_usd
        assert await store.balances() == {k: Balance(0, v) for k, v in spent.items()}
        await store.close()

    asyncio.run(main())
