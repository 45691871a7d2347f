"""Files and batches as rows of the shared database (the usage and credit records' database; migrations/0002).

Every query that a client's request makes names the owner (the key id): another key's file or batch is not found.
A batch is worked on by the one runner that holds its lease (`claim`, `renew`): a runner that dies stops renewing,
and once the lease lapses another runner (or the restarted one) claims the batch again and runs it from the start,
up to `max_attempts` runs. So no batch stays `in_progress` for ever, and none is run twice at once.
"""

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from serve_app.errors import ServeAppError, Unavailable
from serve_app.tenancy.metering import (
    _SQLITE_BEGIN, ACTIVE_BATCH_STATUSES, CREDIT_SPEND, METADATA, USAGE_RECORDS, UsageRecord, _alembic_lock,
    _describe, _row, create_engine, migrate,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

ACTIVE = ACTIVE_BATCH_STATUSES
TERMINAL = ("failed", "completed", "expired", "cancelled")
CLAIM_WINDOW = 256  # the oldest waiting batches among which a runner picks the least recently served owner's

BATCH_FILES = sa.Table(
    "batch_files", METADATA,
    sa.Column("id", sa.Text(), primary_key=True),
    sa.Column("owner", sa.Text(), nullable=False),
    sa.Column("purpose", sa.Text(), nullable=False),
    sa.Column("filename", sa.Text(), nullable=False),
    sa.Column("bytes", sa.BigInteger(), nullable=False),
    sa.Column("lines", sa.BigInteger(), nullable=False),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Column("expires_at", sa.BigInteger(), nullable=False),
    sa.Column("object_name", sa.Text(), nullable=False),
    sa.Index("ix_batch_files_owner_created_at", "owner", "created_at"),
    sa.Index("ix_batch_files_expires_at", "expires_at"),
)
BATCHES = sa.Table(
    "batches", METADATA,
    sa.Column("id", sa.Text(), primary_key=True),
    sa.Column("owner", sa.Text(), nullable=False),
    sa.Column("endpoint", sa.Text(), nullable=False),
    sa.Column("input_file_id", sa.Text(), nullable=False),
    sa.Column("completion_window", sa.Text(), nullable=False),
    sa.Column("status", sa.Text(), nullable=False),
    sa.Column("model", sa.Text(), nullable=True),
    sa.Column("output_file_id", sa.Text(), nullable=True),
    sa.Column("error_file_id", sa.Text(), nullable=True),
    sa.Column("errors", sa.Text(), nullable=True),  # JSON: [{code, message, param, line}]
    sa.Column("metadata", sa.Text(), nullable=True),  # JSON: the client's metadata
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Column("in_progress_at", sa.BigInteger(), nullable=True),
    sa.Column("expires_at", sa.BigInteger(), nullable=False),
    sa.Column("finalizing_at", sa.BigInteger(), nullable=True),
    sa.Column("completed_at", sa.BigInteger(), nullable=True),
    sa.Column("failed_at", sa.BigInteger(), nullable=True),
    sa.Column("expired_at", sa.BigInteger(), nullable=True),
    sa.Column("cancelling_at", sa.BigInteger(), nullable=True),
    sa.Column("cancelled_at", sa.BigInteger(), nullable=True),
    sa.Column("total", sa.BigInteger(), nullable=False),
    sa.Column("completed", sa.BigInteger(), nullable=False),
    sa.Column("failed", sa.BigInteger(), nullable=False),
    sa.Column("input_tokens", sa.BigInteger(), nullable=False),
    sa.Column("images", sa.BigInteger(), nullable=False),
    # What the batch may still cost, counted as spent by every replica's credit check until it ends.
    sa.Column("held_nano_usd", sa.BigInteger(), nullable=False),
    sa.Column("runner", sa.Text(), nullable=True),
    sa.Column("lease_until_us", sa.BigInteger(), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False),
    sa.Index("ix_batches_owner_created_at", "owner", "created_at"),
    sa.Index("ix_batches_status", "status"),
)


def now_s() -> int:
    return int(time.time())


def _now_us() -> int:
    return int(time.time() * 1_000_000)


class BatchRecords:
    """The files' and batches' rows. Methods raise Unavailable (503) while the database is away."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self._engine = create_engine(url, timeout_s)
        self._timeout_s = timeout_s
        self._migrated = False
        insert = sa.dialects.postgresql.insert if self._engine.dialect.name == "postgresql" \
            else sa.dialects.sqlite.insert
        self._insert_usage = insert(USAGE_RECORDS).on_conflict_do_nothing(index_elements=["request_id"]).returning(
            USAGE_RECORDS.c.cost_nano_usd)
        spend = insert(CREDIT_SPEND)
        self._add_spend = spend.on_conflict_do_update(
            index_elements=["key_id"],
            set_={"spent_nano_usd": CREDIT_SPEND.c.spent_nano_usd + spend.excluded.spent_nano_usd},
        )

    async def close(self) -> None:
        await self._engine.dispose()

    async def _db(self, work: Callable[[AsyncConnection], Awaitable[T]], write: bool = False,
                  immediate: bool = False) -> T:
        """`immediate`: on SQLite the transaction takes the write lock before it reads (a read-then-write
        check holds); PostgreSQL's callers lock what they need themselves."""
        async def run() -> T:
            if not self._migrated:
                async with _alembic_lock():
                    if not self._migrated:
                        await migrate(self._engine)
                        self._migrated = True
            if not write:
                async with self._engine.connect() as conn:
                    return await work(conn)
            async with self._engine.connect() as conn:
                if immediate and self._engine.dialect.name == "sqlite":
                    conn = await conn.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
                async with conn.begin():
                    return await work(conn)

        try:
            return await asyncio.wait_for(run(), self._timeout_s)
        except ServeAppError:
            raise
        except Exception as exc:
            logger.warning("batch database call failed: %s", _describe(exc))
            raise Unavailable("files and batches are unavailable for a moment; retry shortly") from exc

    # ------------------------------------------------------------ files

    async def add_file(self, row: dict[str, Any]) -> None:
        await self._db(lambda c: c.execute(sa.insert(BATCH_FILES).values(**row)), write=True)

    async def file(self, owner: str | None, file_id: str) -> dict[str, Any] | None:
        query = sa.select(BATCH_FILES).where(BATCH_FILES.c.id == file_id)
        if owner is not None:
            query = query.where(BATCH_FILES.c.owner == owner)
        return await self._one(query)

    async def files(self, owner: str, purpose: str | None, after: str | None, limit: int,
                    order: str = "desc") -> list[dict[str, Any]]:
        query = sa.select(BATCH_FILES).where(BATCH_FILES.c.owner == owner)
        if purpose:
            query = query.where(BATCH_FILES.c.purpose == purpose)
        return await self._page(BATCH_FILES, query, owner, after, limit, order)

    async def stored(self, owner: str) -> tuple[int, int]:
        """(files, bytes) the owner keeps."""
        async def work(conn: AsyncConnection) -> tuple[int, int]:
            count, size = (await conn.execute(sa.select(
                sa.func.count(), sa.func.coalesce(sa.func.sum(BATCH_FILES.c.bytes), 0),
            ).where(BATCH_FILES.c.owner == owner))).one()
            return int(count), int(size)

        return await self._db(work)

    async def delete_file(self, owner: str | None, file_id: str) -> dict[str, Any] | None:
        """The row deleted (its object is the caller's to delete), or None."""
        async def work(conn: AsyncConnection) -> dict[str, Any] | None:
            query = sa.select(BATCH_FILES).where(BATCH_FILES.c.id == file_id)
            if owner is not None:
                query = query.where(BATCH_FILES.c.owner == owner)
            row = (await conn.execute(query)).mappings().first()
            if row is not None:
                await conn.execute(sa.delete(BATCH_FILES).where(BATCH_FILES.c.id == file_id))
            return dict(row) if row else None

        return await self._db(work, write=True)

    async def expired_files(self, now: int, limit: int = 100) -> list[dict[str, Any]]:
        return await self._all(sa.select(BATCH_FILES).where(BATCH_FILES.c.expires_at <= now)
                               .order_by(BATCH_FILES.c.expires_at).limit(limit))

    # ------------------------------------------------------------ batches

    async def add_batch(self, row: dict[str, Any], max_active: int) -> bool:
        """Inserts the batch unless its owner already has `max_active` batches not finished (False then)."""
        async def work(conn: AsyncConnection) -> bool:
            if conn.dialect.name == "postgresql":  # one create per owner at a time: the count then holds
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": row["owner"]})
            active = await conn.scalar(sa.select(sa.func.count()).select_from(BATCHES).where(
                BATCHES.c.owner == row["owner"], BATCHES.c.status.in_(ACTIVE)))
            if active >= max_active:
                return False
            await conn.execute(sa.insert(BATCHES).values(**row))
            return True

        return await self._db(work, write=True, immediate=True)

    async def batch(self, owner: str | None, batch_id: str) -> dict[str, Any] | None:
        query = sa.select(BATCHES).where(BATCHES.c.id == batch_id)
        if owner is not None:
            query = query.where(BATCHES.c.owner == owner)
        return await self._one(query)

    async def batches(self, owner: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        return await self._page(BATCHES, sa.select(BATCHES).where(BATCHES.c.owner == owner), owner, after, limit,
                                "desc")

    async def request_cancel(self, owner: str, batch_id: str) -> dict[str, Any] | None:
        """A running batch becomes `cancelling` (its runner stops it); the row as it is after."""
        async def work(conn: AsyncConnection) -> dict[str, Any] | None:
            await conn.execute(sa.update(BATCHES).where(
                BATCHES.c.id == batch_id, BATCHES.c.owner == owner,
                BATCHES.c.status.in_(("validating", "in_progress", "finalizing")),
            ).values(status="cancelling", cancelling_at=now_s()))
            row = (await conn.execute(sa.select(BATCHES).where(BATCHES.c.id == batch_id, BATCHES.c.owner == owner))
                   ).mappings().first()
            return dict(row) if row else None

        return await self._db(work, write=True)

    async def claim(self, runner: str, lease_s: float) -> dict[str, Any] | None:
        """An unfinished batch whose lease has lapsed (new ones have none), now leased to `runner`: the oldest of
        the owner served least recently (the one whose last batch started longest ago, or never), so that one
        key's queue of batches does not hold every other key's back."""
        async def work(conn: AsyncConnection) -> dict[str, Any] | None:
            now = _now_us()
            waiting = (await conn.execute(
                sa.select(BATCHES.c.id, BATCHES.c.lease_until_us, BATCHES.c.owner).where(
                    BATCHES.c.status.in_(ACTIVE), BATCHES.c.lease_until_us < now,
                ).order_by(BATCHES.c.created_at, BATCHES.c.id).limit(CLAIM_WINDOW)
            )).all()
            if not waiting:
                return None
            owners = {owner for _, _, owner in waiting}
            served = dict((await conn.execute(
                sa.select(BATCHES.c.owner, sa.func.max(BATCHES.c.in_progress_at))
                .where(BATCHES.c.owner.in_(owners)).group_by(BATCHES.c.owner)
            )).tuples().all())
            order = {c[0]: i for i, c in enumerate(waiting)}
            candidates = sorted(waiting, key=lambda c: (served.get(c[2]) or 0, order[c[0]]))[:8]
            for batch_id, lease, _owner in candidates:
                taken = await conn.execute(sa.update(BATCHES).where(
                    BATCHES.c.id == batch_id, BATCHES.c.lease_until_us == lease,  # nobody took it meanwhile
                ).values(runner=runner, lease_until_us=now + int(lease_s * 1e6), attempts=BATCHES.c.attempts + 1))
                if taken.rowcount == 1:
                    row = (await conn.execute(sa.select(BATCHES).where(BATCHES.c.id == batch_id))).mappings().one()
                    return dict(row)
            return None

        return await self._db(work, write=True)

    async def renew(self, batch_id: str, runner: str, lease_s: float, **values: Any) -> dict[str, Any] | None:
        """Extends the lease and writes `values`; the row as it is now, or None when the lease is no longer
        `runner`'s (then it must stop: another runner has the batch)."""
        async def work(conn: AsyncConnection) -> dict[str, Any] | None:
            done = await conn.execute(sa.update(BATCHES).where(
                BATCHES.c.id == batch_id, BATCHES.c.runner == runner,
            ).values(lease_until_us=_now_us() + int(lease_s * 1e6), **values))
            if done.rowcount != 1:
                return None
            return dict((await conn.execute(sa.select(BATCHES).where(BATCHES.c.id == batch_id))).mappings().one())

        return await self._db(work, write=True)

    async def start(self, batch_id: str, runner: str, lease_s: float, **values: Any) -> dict[str, Any] | None:
        """`in_progress` with `values`, from `validating` or, for a batch run again, from where the runner that died
        left it (`in_progress`, `finalizing`), unless a cancel came first; the row as it is now (None: the lease is
        not `runner`'s)."""
        async def work(conn: AsyncConnection) -> dict[str, Any] | None:
            await conn.execute(sa.update(BATCHES).where(
                BATCHES.c.id == batch_id, BATCHES.c.runner == runner,
                BATCHES.c.status.in_(("validating", "in_progress", "finalizing")),
            ).values(status="in_progress", lease_until_us=_now_us() + int(lease_s * 1e6), **values))
            row = (await conn.execute(sa.select(BATCHES).where(BATCHES.c.id == batch_id,
                                                               BATCHES.c.runner == runner))).mappings().first()
            return dict(row) if row else None

        return await self._db(work, write=True)

    async def finish(self, batch_id: str, runner: str | None, values: dict[str, Any],
                     usage: UsageRecord | None = None, files: list[dict[str, Any]] = ()) -> bool:
        """The batch's end in one transaction: its final status, its output files' rows, its usage record and
        its spend (the record is idempotent by the batch's id: a finish retried charges once), its hold gone.
        False when the lease is not `runner`'s (None: whoever holds it)."""
        async def work(conn: AsyncConnection) -> bool:
            where = [BATCHES.c.id == batch_id, BATCHES.c.status.in_(ACTIVE)]
            if runner is not None:
                where.append(BATCHES.c.runner == runner)
            done = await conn.execute(sa.update(BATCHES).where(*where).values(
                held_nano_usd=0, lease_until_us=2**62, **values))
            if done.rowcount != 1:
                return False
            for row in files:
                await conn.execute(sa.insert(BATCH_FILES).values(**row))
            if usage is not None:
                inserted = (await conn.execute(self._insert_usage, [_row(usage)._asdict()])).scalars().all()
                if inserted and inserted[0]:
                    await conn.execute(self._add_spend, [{"key_id": usage.key_id, "spent_nano_usd": inserted[0]}])
            return True

        return await self._db(work, write=True)

    async def credit_left(self, owner: str) -> int:
        """The owner's admin grants less its spend and its unfinished batches' holds (the keys file's grant is
        the caller's to add)."""
        from serve_app.tenancy.metering import CREDIT_GRANTS

        async def work(conn: AsyncConnection) -> int:
            granted = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(CREDIT_GRANTS.c.amount_nano_usd), 0))
                                        .where(CREDIT_GRANTS.c.key_id == owner))
            spent = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(CREDIT_SPEND.c.spent_nano_usd), 0))
                                      .where(CREDIT_SPEND.c.key_id == owner))
            held = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(BATCHES.c.held_nano_usd), 0))
                                     .where(BATCHES.c.owner == owner, BATCHES.c.status.in_(ACTIVE)))
            return int(granted) - int(spent) - int(held)

        return await self._db(work)

    # ------------------------------------------------------------ helpers

    async def _one(self, query: Any) -> dict[str, Any] | None:
        async def work(conn: AsyncConnection) -> dict[str, Any] | None:
            row = (await conn.execute(query)).mappings().first()
            return dict(row) if row else None

        return await self._db(work)

    async def _all(self, query: Any) -> list[dict[str, Any]]:
        async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
            return [dict(r) for r in (await conn.execute(query)).mappings().all()]

        return await self._db(work)

    async def _page(self, table: sa.Table, query: Any, owner: str, after: str | None, limit: int,
                    order: str) -> list[dict[str, Any]]:
        """`limit` rows in (created_at, id) order from after the row `after` (OpenAI's cursor); +1 to tell
        `has_more`."""
        async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
            q = query
            if after is not None:
                cursor = (await conn.execute(sa.select(table.c.created_at).where(
                    table.c.id == after, table.c.owner == owner))).first()
                if cursor is not None:
                    key = sa.tuple_(table.c.created_at, table.c.id)
                    q = q.where(key < sa.tuple_(cursor[0], after) if order == "desc"
                                else key > sa.tuple_(cursor[0], after))
            keys = (table.c.created_at.desc(), table.c.id.desc()) if order == "desc" else \
                (table.c.created_at, table.c.id)
            return [dict(r) for r in (await conn.execute(q.order_by(*keys).limit(limit + 1))).mappings().all()]

        return await self._db(work)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)
