"""Files and batches as database rows (serve_app/batch/records.py): pages, ownership, the per-key cap on batches
in progress, leases, cancelling, the one-transaction finish and the credit that unfinished batches hold.

On SQLite files of their own; the `postgres` tests run the same SQL on the session's real PostgreSQL, each in a
database of its own (claims take the oldest batch of the whole database).
"""

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from serve_app.batch.records import ACTIVE, BATCH_FILES, BATCHES, TERMINAL, BatchRecords
from serve_app.tenancy.metering import Balance, UsageRecord, UsageStore


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def file_row(file_id: str, owner: str = "key_a", created_at: int = 1000, purpose: str = "batch") -> dict[str, Any]:
    return {"id": file_id, "owner": owner, "purpose": purpose, "filename": f"{file_id}.jsonl", "bytes": 10,
            "lines": 1, "created_at": created_at, "expires_at": created_at + 86400, "object_name": f"files/{file_id}"}


def batch_row(batch_id: str, owner: str = "key_a", created_at: int = 1000, status: str = "validating",
              held: int = 0) -> dict[str, Any]:
    """A batch as BatchAPI.create writes one (no lease, no attempt yet)."""
    return {"id": batch_id, "owner": owner, "endpoint": "/v1/embeddings", "input_file_id": "file-in",
            "completion_window": "24h", "status": status, "metadata": None, "created_at": created_at,
            "expires_at": int(time.time()) + 86400, "total": 0, "completed": 0, "failed": 0, "input_tokens": 0,
            "images": 0, "held_nano_usd": held, "lease_until_us": 0, "attempts": 0}


def usage(batch_id: str, owner: str = "key_a", cost: int = 123) -> UsageRecord:
    return UsageRecord(request_id=batch_id, key_id=owner, model="tiny-clip", route="/v1/batches", input_tokens=40,
                       images=2, status=200, cost_nano_usd=cost, created_at=time.time())


def with_records(url: str, work):
    """Runs `work(records)` on records of `url` (an engine belongs to the event loop that made it)."""

    async def main():
        records = BatchRecords(url)
        try:
            return await work(records)
        finally:
            await records.close()

    return asyncio.run(main())


async def rows(url: str, query: str) -> list[tuple]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(r) for r in await conn.execute(sa.text(query))]
    finally:
        await engine.dispose()


def ids(page: list[dict[str, Any]]) -> list[str]:
    return [row["id"] for row in page]


# ---------------------------------------------------------------- files


async def _files_pages_and_ownership(records: BatchRecords, a: str = "key_a", b: str = "key_b") -> None:
    # f0..f4 one second apart; f5 and f6 in the same second as f4 (the id breaks the tie); one of another owner
    for i in range(5):
        await records.add_file(file_row(f"file-{i}", a, created_at=1000 + i))
    await records.add_file(file_row("file-5", a, created_at=1004))
    await records.add_file(file_row("file-6", a, created_at=1004, purpose="batch_output"))
    await records.add_file(file_row("file-other", b, created_at=1010))

    newest = await records.files(a, None, None, limit=3)
    assert ids(newest) == ["file-6", "file-5", "file-4", "file-3"]  # limit + 1: the last only tells has_more
    page = await records.files(a, None, "file-4", limit=3)
    assert ids(page) == ["file-3", "file-2", "file-1", "file-0"]
    assert ids(await records.files(a, None, "file-1", limit=3)) == ["file-0"]  # has_more: False
    assert ids(await records.files(a, None, "file-0", limit=3)) == []
    assert ids(await records.files(a, None, None, limit=2, order="asc")) == ["file-0", "file-1", "file-2"]
    assert ids(await records.files(a, None, "file-4", limit=5, order="asc")) == ["file-5", "file-6"]
    assert ids(await records.files(a, "batch_output", None, limit=10)) == ["file-6"]
    assert ids(await records.files(a, "batch", "file-5", limit=10)) == ["file-4", "file-3", "file-2", "file-1",
                                                                         "file-0"]
    # another owner's id is no cursor: the page starts at the beginning, and shows nothing of theirs
    assert ids(await records.files(a, None, "file-other", limit=2)) == ["file-6", "file-5", "file-4"]
    assert ids(await records.files(b, None, None, limit=10)) == ["file-other"]

    assert (await records.file(a, "file-2"))["object_name"] == "files/file-2"
    assert await records.file(b, "file-2") is None
    assert (await records.file(None, "file-2"))["owner"] == a  # the runner's and the sweeper's view
    assert await records.file(a, "file-missing") is None
    assert await records.delete_file(b, "file-2") is None  # another owner deletes nothing
    assert (await records.delete_file(a, "file-2"))["id"] == "file-2"
    assert await records.file(a, "file-2") is None
    assert await records.delete_file(a, "file-2") is None


def test_files_come_in_pages_newest_first_and_only_to_their_owner(tmp_path: Path) -> None:
    with_records(url_of(tmp_path / "db.sqlite"), _files_pages_and_ownership)


def test_expired_files_are_listed_oldest_first(tmp_path: Path) -> None:
    async def work(records: BatchRecords) -> None:
        for i, expires in enumerate((300, 100, 200, 400)):
            await records.add_file(file_row(f"file-{i}") | {"expires_at": expires})
        assert ids(await records.expired_files(250)) == ["file-1", "file-2"]
        assert ids(await records.expired_files(300)) == ["file-1", "file-2", "file-0"]
        assert ids(await records.expired_files(300, limit=1)) == ["file-1"]
        assert await records.expired_files(99) == []

    with_records(url_of(tmp_path / "db.sqlite"), work)


# ---------------------------------------------------------------- batches


def test_a_key_has_at_most_max_active_batches_unfinished(tmp_path: Path) -> None:
    async def work(records: BatchRecords) -> None:
        assert await records.add_batch(batch_row("batch-1"), max_active=2)
        assert await records.add_batch(batch_row("batch-2", status="in_progress"), max_active=2)
        assert not await records.add_batch(batch_row("batch-3"), max_active=2)
        assert await records.batch("key_a", "batch-3") is None
        assert await records.add_batch(batch_row("batch-b", owner="key_b"), max_active=2)  # each key its own
        # finished batches do not count
        assert await records.finish("batch-1", None, {"status": "completed", "completed_at": 1})
        assert await records.add_batch(batch_row("batch-3"), max_active=2)
        assert not await records.add_batch(batch_row("batch-4"), max_active=2)
        assert await records.add_batch(batch_row("batch-4"), max_active=3)
        assert ids(await records.batches("key_a", None, 10)) == ["batch-4", "batch-3", "batch-2", "batch-1"]
        assert await records.batch("key_b", "batch-1") is None
        assert (await records.batch(None, "batch-1"))["status"] == "completed"

    with_records(url_of(tmp_path / "db.sqlite"), work)


def test_batches_come_in_pages_newest_first(tmp_path: Path) -> None:
    async def work(records: BatchRecords) -> None:
        for i in range(5):
            await records.add_batch(batch_row(f"batch-{i}", created_at=1000 + i), max_active=10)
        await records.add_batch(batch_row("batch-other", owner="key_b", created_at=2000), max_active=10)
        assert ids(await records.batches("key_a", None, 2)) == ["batch-4", "batch-3", "batch-2"]
        assert ids(await records.batches("key_a", "batch-3", 2)) == ["batch-2", "batch-1", "batch-0"]
        assert ids(await records.batches("key_a", "batch-1", 2)) == ["batch-0"]
        assert ids(await records.batches("key_b", None, 5)) == ["batch-other"]

    with_records(url_of(tmp_path / "db.sqlite"), work)


async def _claims_and_leases(records: BatchRecords, created_at: int = 1000) -> None:
    await records.add_batch(batch_row("batch-old", created_at=created_at), max_active=10)
    await records.add_batch(batch_row("batch-new", created_at=created_at + 1), max_active=10)

    first = await records.claim("runner-1", lease_s=0.3)
    assert first["id"] == "batch-old" and first["runner"] == "runner-1" and first["attempts"] == 1
    assert first["lease_until_us"] > time.time() * 1e6
    second = await records.claim("runner-2", lease_s=0.3)
    assert second["id"] == "batch-new" and second["attempts"] == 1
    assert await records.claim("runner-3", lease_s=0.3) is None  # both leases hold

    renewed = await records.renew("batch-old", "runner-1", 0.3, completed=2, failed=1)
    assert (renewed["runner"], renewed["completed"], renewed["failed"]) == ("runner-1", 2, 1)
    assert await records.renew("batch-old", "runner-2", 0.3) is None  # not runner-2's

    await asyncio.sleep(0.45)  # both leases lapse (their runners died): the oldest is taken again first
    again = await records.claim("runner-3", lease_s=30)
    assert again["id"] == "batch-old" and again["runner"] == "runner-3" and again["attempts"] == 2
    assert again["completed"] == 2  # the row as the last run left it; the new run starts over
    assert await records.renew("batch-old", "runner-1", 30, completed=99) is None  # runner-1 lost the batch
    assert (await records.batch(None, "batch-old"))["completed"] == 2
    assert (await records.claim("runner-4", lease_s=30))["id"] == "batch-new"
    assert await records.claim("runner-5", lease_s=30) is None

    # a runner that lets go of its lease (a negative one) hands the batch to the next claim at once
    assert await records.renew("batch-old", "runner-3", -30) is not None
    handed = await records.claim("runner-5", lease_s=30)
    assert handed["id"] == "batch-old" and handed["attempts"] == 3

    # finished batches are never claimed
    assert await records.finish("batch-old", "runner-5", {"status": "completed", "completed_at": 1})
    assert await records.finish("batch-new", "runner-4", {"status": "failed", "failed_at": 1})
    await asyncio.sleep(0.01)
    assert await records.claim("runner-6", lease_s=0.01) is None


def test_claims_take_the_oldest_batch_once_and_again_after_its_lease_lapses(tmp_path: Path) -> None:
    with_records(url_of(tmp_path / "db.sqlite"), _claims_and_leases)


def test_a_cancelled_batch_is_claimed_so_that_its_runner_ends_it(tmp_path: Path) -> None:
    async def work(records: BatchRecords) -> None:
        await records.add_batch(batch_row("batch-1"), max_active=10)
        assert (await records.request_cancel("key_a", "batch-1"))["status"] == "cancelling"
        claimed = await records.claim("runner-1", lease_s=30)
        assert claimed["id"] == "batch-1" and claimed["status"] == "cancelling"

    with_records(url_of(tmp_path / "db.sqlite"), work)


def test_cancel_moves_running_batches_to_cancelling_and_leaves_finished_ones(tmp_path: Path) -> None:
    async def work(records: BatchRecords) -> None:
        statuses = ("validating", "in_progress", "finalizing", "cancelling", *TERMINAL)
        for status in statuses:
            await records.add_batch(batch_row(f"batch-{status}", status=status), max_active=100)
        before = int(time.time())
        for status in statuses:
            row = await records.request_cancel("key_a", f"batch-{status}")
            if status in ("validating", "in_progress", "finalizing"):
                assert row["status"] == "cancelling" and row["cancelling_at"] >= before, status
            else:
                assert row["status"] == status and row["cancelling_at"] is None, status
        assert await records.request_cancel("key_b", "batch-validating") is None  # not theirs: not found
        assert await records.request_cancel("key_a", "batch-missing") is None

    with_records(url_of(tmp_path / "db.sqlite"), work)


def test_a_cancel_requested_during_validation_survives_the_move_to_in_progress(tmp_path: Path) -> None:
    async def work(records: BatchRecords) -> None:
        await records.add_batch(batch_row("batch-1"), max_active=10)
        await records.claim("runner-1", lease_s=30)
        await records.request_cancel("key_a", "batch-1")  # while the runner validates the input file
        # what BatchWork._work does next; it checks started["status"] to learn that it must stop
        started = await records.start("batch-1", "runner-1", 30, in_progress_at=1, total=3)
        assert started["status"] == "cancelling"

    with_records(url_of(tmp_path / "db.sqlite"), work)


# ---------------------------------------------------------------- the end of a batch and credit


async def _finish_once(records: BatchRecords, url: str, owner: str = "key_a") -> None:
    batch_id = f"batch-{uuid.uuid4().hex[:8]}"
    await records.add_batch(batch_row(batch_id, owner=owner, held=5000), max_active=10)
    await records.claim("runner-1", lease_s=30)
    await records.renew(batch_id, "runner-1", 30, status="in_progress", in_progress_at=1, total=3, held_nano_usd=5000)
    assert await records.credit_left(owner) == -5000  # no grant yet; the hold counts as spent

    out = file_row(f"file-out-{batch_id}", owner, purpose="batch_output")
    values = {"status": "completed", "completed_at": 2, "completed": 3, "failed": 0, "input_tokens": 40,
              "images": 2, "output_file_id": out["id"]}
    assert not await records.finish(batch_id, "runner-2", values, usage(batch_id, owner), [out])  # not its lease
    assert await records.file(owner, out["id"]) is None
    assert await records.finish(batch_id, "runner-1", values, usage(batch_id, owner), [out])

    row = await records.batch(owner, batch_id)
    assert (row["status"], row["completed"], row["input_tokens"], row["images"], row["output_file_id"],
            row["held_nano_usd"]) == ("completed", 3, 40, 2, out["id"], 0)
    assert row["lease_until_us"] > time.time() * 1e6  # never claimed again
    assert (await records.file(owner, out["id"]))["purpose"] == "batch_output"
    assert await records.credit_left(owner) == -123  # the hold gone, the cost spent

    # a second finish (a retry, or a runner that lost the lease meanwhile) writes and charges nothing
    other = file_row(f"file-again-{batch_id}", owner, purpose="batch_output")
    assert not await records.finish(batch_id, "runner-1", values | {"status": "failed"}, usage(batch_id, owner),
                                    [other])
    assert not await records.finish(batch_id, None, values, usage(batch_id, owner, cost=999), [other])
    assert (await records.batch(owner, batch_id))["status"] == "completed"
    assert await records.file(owner, other["id"]) is None
    assert await records.credit_left(owner) == -123
    assert await rows(url, f"SELECT request_id, key_id, route, cost_nano_usd FROM usage_records "
                           f"WHERE request_id = '{batch_id}'") == [(batch_id, owner, "/v1/batches", 123)]
    assert await rows(url, f"SELECT spent_nano_usd FROM credit_spend WHERE key_id = '{owner}'") == [(123,)]


def test_finish_writes_the_end_the_files_and_the_charge_once(tmp_path: Path) -> None:
    url = url_of(tmp_path / "db.sqlite")
    with_records(url, lambda records: _finish_once(records, url))


def test_finish_without_a_runner_ends_whoever_holds_the_batch(tmp_path: Path) -> None:
    async def work(records: BatchRecords) -> None:
        await records.add_batch(batch_row("batch-1"), max_active=10)
        await records.claim("runner-1", lease_s=30)
        assert await records.finish("batch-1", None, {"status": "failed", "failed_at": 1, "errors": "[]"})
        assert (await records.batch("key_a", "batch-1"))["status"] == "failed"
        assert not await records.finish("batch-1", None, {"status": "failed", "failed_at": 2})
        await records.add_batch(batch_row("batch-2"), max_active=10)  # never claimed: no runner
        assert await records.finish("batch-2", None, {"status": "expired", "expired_at": 1})

    with_records(url_of(tmp_path / "db.sqlite"), work)


async def _credit_and_holds(url: str, a: str = "key_a", b: str = "key_b", c: str = "key_c") -> None:
    store = UsageStore(url, flush_interval_s=60)
    await store.start()
    records = BatchRecords(url)
    try:
        await store.grant(a, 10_000)
        await store.grant(a, 2_000)
        store.record(UsageRecord(request_id=f"req-{uuid.uuid4().hex}", key_id=a, model="m", route="/v1/embeddings",
                                 input_tokens=1, images=0, status=200, cost_nano_usd=300, created_at=time.time()))
        await store.flush()
        for i, (status, held) in enumerate((("validating", 100), ("in_progress", 1_000), ("finalizing", 20),
                                            ("cancelling", 3), ("completed", 50_000), ("failed", 60_000),
                                            ("cancelled", 70_000), ("expired", 80_000))):
            await records.add_batch(batch_row(f"batch-{a}-{i}", owner=a, status=status, held=held), max_active=100)
        await records.add_batch(batch_row(f"batch-{b}", owner=b, status="in_progress", held=7), max_active=100)
        await records.add_batch(batch_row(f"batch-{c}", owner=c, status="completed", held=9), max_active=100)

        holds = 100 + 1_000 + 20 + 3  # unfinished batches only
        assert await records.credit_left(a) == 12_000 - 300 - holds
        assert await records.credit_left(b) == -7
        assert await records.credit_left(c) == 0
        balances = await store.balances()
        assert balances[a] == Balance(12_000, 300 + holds)
        assert balances[b] == Balance(0, 7)  # a key with only a hold
        assert c not in balances  # a finished batch holds nothing

        # the batch's end settles its hold to its real cost
        assert await records.finish(f"batch-{a}-1", None, {"status": "completed", "completed_at": 1},
                                    usage(f"batch-{a}-1", a, cost=400))
        assert await records.credit_left(a) == 12_000 - 300 - 400 - (holds - 1_000)
        assert (await store.balances())[a] == Balance(12_000, 300 + 400 + holds - 1_000)
    finally:
        await records.close()
        await store.close()


def test_credit_left_is_grants_less_spend_less_the_holds_of_unfinished_batches(tmp_path: Path) -> None:
    asyncio.run(_credit_and_holds(url_of(tmp_path / "db.sqlite")))


def test_the_records_and_the_usage_store_migrate_one_database_in_either_order(tmp_path: Path) -> None:
    url = url_of(tmp_path / "db.sqlite")
    with_records(url, lambda records: records.add_file(file_row("file-1")))  # the records migrate first

    async def main() -> None:
        store = UsageStore(url)
        await store.start()
        assert store.healthy and await store.balances() == {}
        await store.close()

    asyncio.run(main())
    assert asyncio.run(rows(url, "SELECT version_num FROM usage_alembic_version")) == [("0002",)]


def test_tables_and_statuses_agree_with_the_usage_stores_view() -> None:
    from serve_app.tenancy.metering import ACTIVE_BATCH_STATUSES, METADATA

    assert METADATA.tables["batches"] is BATCHES and METADATA.tables["batch_files"] is BATCH_FILES
    assert ACTIVE == ACTIVE_BATCH_STATUSES and not set(ACTIVE) & set(TERMINAL)


# ---------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A database of this test's own on the session's PostgreSQL (role `clip` may create databases)."""
    import asyncpg

    name = f"batch_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=postgres_server.port, user="clip", password="clip",
                                     database="clip", timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"postgresql+asyncpg://clip:clip@127.0.0.1:{postgres_server.port}/{name}"


def test_postgres_pages_claims_finish_and_credit(postgres_url: str) -> None:
    with_records(postgres_url, _files_pages_and_ownership)
    with_records(postgres_url, _claims_and_leases)
    with_records(postgres_url, lambda records: _finish_once(records, postgres_url, owner="key_pg"))
    asyncio.run(_credit_and_holds(postgres_url, "key_pa", "key_pb", "key_pc"))


def test_postgres_runners_claiming_at_once_take_each_batch_once(postgres_url: str) -> None:
    async def main() -> list[dict[str, Any] | None]:
        runners = [BatchRecords(postgres_url) for _ in range(8)]
        try:
            for i in range(4):
                assert await runners[0].add_batch(batch_row(f"batch-{i}", created_at=1000 + i), max_active=10)
            await asyncio.gather(*(r.file(None, "file-none") for r in runners[1:]))  # migrated and connected
            return await asyncio.gather(*(r.claim(f"runner-{n}", lease_s=30) for n, r in enumerate(runners)))
        finally:
            await asyncio.gather(*(r.close() for r in runners))

    claimed = asyncio.run(main())
    taken = [row["id"] for row in claimed if row is not None]
    assert sorted(taken) == [f"batch-{i}" for i in range(4)]  # each once, none twice, none left


def test_postgres_creates_at_once_respect_max_active(postgres_url: str) -> None:
    async def main() -> list[bool]:
        ingresses = [BatchRecords(postgres_url) for _ in range(8)]
        try:
            await asyncio.gather(*(r.file(None, "file-none") for r in ingresses))  # migrated and connected
            return await asyncio.gather(*(r.add_batch(batch_row(f"batch-{n}"), max_active=2)
                                          for n, r in enumerate(ingresses)))
        finally:
            await asyncio.gather(*(r.close() for r in ingresses))

    assert sum(asyncio.run(main())) == 2


def test_claims_take_turns_between_owners(tmp_path: Path) -> None:
    """A key with a queue of batches does not hold a later key's batch back: after one of its batches started,
    the next claim goes to the owner served least recently."""
    async def work(records: BatchRecords) -> None:
        for i, (owner, created) in enumerate([("key_a", 1000), ("key_a", 1001), ("key_a", 1002), ("key_b", 1003)]):
            await records.add_batch(batch_row(f"batch-{i}", owner=owner, created_at=created), max_active=10)
        first = await records.claim("runner-1", lease_s=30)
        assert first["id"] == "batch-0"
        await records.start("batch-0", "runner-1", 30, in_progress_at=2000)
        await records.finish("batch-0", "runner-1", {"status": "completed", "completed_at": 2001})
        second = await records.claim("runner-1", lease_s=30)
        assert second["id"] == "batch-3"  # key_b's, though key_a's batch-1 is older
        await records.start("batch-3", "runner-1", 30, in_progress_at=2002)
        await records.finish("batch-3", "runner-1", {"status": "completed", "completed_at": 2003})
        assert (await records.claim("runner-1", lease_s=30))["id"] == "batch-1"

    with_records(url_of(tmp_path / "db.sqlite"), work)


def test_stored_counts_the_owners_files_and_bytes(tmp_path: Path) -> None:
    async def work(records: BatchRecords) -> None:
        assert await records.stored("key_a") == (0, 0)
        for i in range(3):
            await records.add_file(file_row(f"file-{i}", owner="key_a"))
        await records.add_file(file_row("file-b", owner="key_b"))
        assert await records.stored("key_a") == (3, 30)
        await records.delete_file("key_a", "file-0")
        assert await records.stored("key_a") == (2, 20)

    with_records(url_of(tmp_path / "db.sqlite"), work)
