"""Usage records and per-key credit in SQL, written off the request path.

`UsageStore.record` only appends to a bounded in-memory spool. A background flusher writes the spool in
batches, each one transaction holding its usage rows (`INSERT ... ON CONFLICT (request_id) DO NOTHING
RETURNING`) and the spend of the rows it actually inserted, so a batch retried after an ambiguous failure (a
commit whose answer was lost) never doubles a record or a charge. A database outage fails no request and loses no
record while the spool has room: a batch that fails stays at the head of the spool and is retried with backoff.

SQLite (`sqlite+aiosqlite:///path.db`) is the local default, PostgreSQL (`postgresql+asyncpg://...`) the
clusters' store shared by every ingress replica; one alembic history (`migrations/`) serves both.

Request ids must be made by the server: a client that chose its request id could repeat one and have its later
requests dropped as duplicates, unbilled.
"""

import asyncio
import itertools
import logging
import math
import time
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from serve_app.errors import InvalidRequest, ServeAppError, Unavailable
from serve_app.tenancy.usage_api import BucketWidth, GroupBy, UsagePage, UsageQuery, build_page, usage_select

logger = logging.getLogger(__name__)

T = TypeVar("T")

VERSION_TABLE = "usage_alembic_version"  # our own, so other alembic histories may share the database
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Key of the PostgreSQL advisory lock that lets one replica at a time migrate ("clipusag" in ASCII).
MIGRATION_LOCK_KEY = 0x636C697075736167
_SQLITE_BEGIN = "clip_sqlite_begin"  # execution option: the statement that opens a SQLite transaction
_MAX_TEXT = 256
_MAX_BIGINT = 2**63 - 1
_BACKOFF_FIRST_S = 0.05
_BACKOFF_CAP_S = 2.0
_DROP_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class UsageRecord:
    """One request's use of the service, as the ingress middleware saw it."""

    request_id: str  # made by the server (see the module's docstring); the table's primary key
    key_id: str
    model: str
    route: str  # "/v1/embeddings"
    input_tokens: int
    images: int
    status: int  # the HTTP status answered
    cost_nano_usd: int  # what the request spent of the key's credit; 0 for refused requests
    created_at: float  # unix seconds


@dataclass(frozen=True)
class Balance:
    """A key's credit as the database has it (add this replica's `UsageStore.pending_cost` for its view)."""

    granted_nano_usd: int
    spent_nano_usd: int

    @property
    def remaining_nano_usd(self) -> int:
        return self.granted_nano_usd - self.spent_nano_usd


# ---------------------------------------------------------------- schema (mirrors migrations/; a test compares)

METADATA = sa.MetaData()
USAGE_RECORDS = sa.Table(
    "usage_records", METADATA,
    sa.Column("request_id", sa.Text(), primary_key=True),
    sa.Column("key_id", sa.Text(), nullable=False),
    sa.Column("model", sa.Text(), nullable=False),
    sa.Column("route", sa.Text(), nullable=False),
    sa.Column("input_tokens", sa.BigInteger(), nullable=False),
    sa.Column("images", sa.BigInteger(), nullable=False),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("cost_nano_usd", sa.BigInteger(), nullable=False),
    # Integer microseconds: buckets are integer division, alike on SQLite and PostgreSQL.
    sa.Column("created_at_us", sa.BigInteger(), nullable=False),
    sa.Index("ix_usage_records_created_at_us", "created_at_us"),
    sa.Index("ix_usage_records_key_id_created_at_us", "key_id", "created_at_us"),
)
CREDIT_SPEND = sa.Table(
    "credit_spend", METADATA,
    sa.Column("key_id", sa.Text(), primary_key=True),
    sa.Column("spent_nano_usd", sa.BigInteger(), nullable=False),
)
CREDIT_GRANTS = sa.Table(
    "credit_grants", METADATA,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("key_id", sa.Text(), nullable=False),
    sa.Column("amount_nano_usd", sa.BigInteger(), nullable=False),
    sa.Column("created_at_us", sa.BigInteger(), nullable=False),
    sa.Column("note", sa.Text(), nullable=False),
    sa.Index("ix_credit_grants_key_id", "key_id"),
)


# Unfinished batches (serve_app/batch/records.py, which defines the table) hold what they may still cost: counted
# as spent by every credit check until the batch ends and its real cost is written.
ACTIVE_BATCH_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
_BATCH_HOLDS = sa.table("batches", sa.column("owner"), sa.column("held_nano_usd"), sa.column("status"))


# ---------------------------------------------------------------- rows


def _text(value: object) -> str:
    """A string every database holds: no NUL, valid UTF-8, bounded. A row the database refuses would stay at
    the head of the spool for ever, so a record's strings are made safe when it is recorded."""
    text = str(value)[:_MAX_TEXT].replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become "?"
    return text


def _count(value: object, high: int = _MAX_BIGINT) -> int:
    return min(max(int(value), 0), high)  # type: ignore[call-overload]


class _Row(NamedTuple):
    """A spooled record as the table has it; a tuple, so a full spool of 100,000 holds some 35 MB, not 100."""

    request_id: str
    key_id: str
    model: str
    route: str
    input_tokens: int
    images: int
    status: int
    cost_nano_usd: int
    created_at_us: int


def _row(rec: UsageRecord) -> _Row:
    created = float(rec.created_at)
    if not math.isfinite(created):
        created = time.time()
    return _Row(
        # A record without an id is still usage: it gets one of its own (and no idempotency).
        request_id=_text(rec.request_id) or f"gen-{uuid.uuid4().hex}",
        key_id=_text(rec.key_id),
        model=_text(rec.model),
        route=_text(rec.route),
        input_tokens=_count(rec.input_tokens),
        images=_count(rec.images),
        status=_count(rec.status, 999),
        cost_nano_usd=_count(rec.cost_nano_usd),
        created_at_us=_count(round(created * 1_000_000)),
    )


# ---------------------------------------------------------------- engine and migrations


def _create_engine(url: sa.URL, timeout_s: float) -> AsyncEngine:
    if url.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": timeout_s})

        # pysqlite opens transactions only before DML, so DDL would run outside one and a migration could be
        # half done; SQLAlchemy's recipe: the driver opens none and we emit BEGIN ourselves.
        @event.listens_for(engine.sync_engine, "connect")
        def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql(connection.get_execution_options().get(_SQLITE_BEGIN, "BEGIN"))

        return engine
    # pool_pre_ping: connections of a PostgreSQL that restarted are replaced before a flush uses them.
    return create_async_engine(
        url, pool_pre_ping=True, pool_size=2, max_overflow=8,
        connect_args={"timeout": timeout_s, "command_timeout": timeout_s},
    )


def _upgrade_to_head(connection: sa.Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def create_engine(url: str, timeout_s: float) -> AsyncEngine:
    """An engine for the shared database (usage, credit and batch records): sqlite+aiosqlite or
    postgresql+asyncpg."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(f"database URLs are sqlite+aiosqlite:// or postgresql+asyncpg://, not {url.split(':')[0]}")
    return _create_engine(parsed, timeout_s)


async def migrate(engine: AsyncEngine) -> None:
    """The database brought to the last revision of `migrations/`, one process at a time."""
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            # The upgrade reads the version table before it writes; a deferred transaction could not then
            # take the write lock beside another process doing the same. Take it first.
            conn = await conn.execution_options(**{_SQLITE_BEGIN: "BEGIN IMMEDIATE"})
        async with conn.begin():
            if engine.dialect.name == "postgresql":
                # Replicas starting at once migrate one after another; the lock ends with the transaction.
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            await conn.run_sync(_upgrade_to_head)


_alembic_locks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]" = weakref.WeakKeyDictionary()


def _alembic_lock() -> asyncio.Lock:
    """Alembic keeps its `context` and `op` as module globals: two upgrades at once in one process (two stores,
    even of two databases) would mix their state. One upgrade at a time per event loop."""
    loop = asyncio.get_running_loop()
    lock = _alembic_locks.get(loop)
    if lock is None:
        lock = _alembic_locks[loop] = asyncio.Lock()
    return lock


def _backoff_s(failures: int) -> float:
    return min(_BACKOFF_CAP_S, _BACKOFF_FIRST_S * 2 ** (failures - 1))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


# ---------------------------------------------------------------- the store


class UsageStore:
    """Usage records and credit of every key, for one ingress replica.

    `record` never blocks, raises or touches the database; the flusher writes the spool every
    `flush_interval_s` (at once when a batch is full), at most `batch_size` rows a transaction. While the
    database is down the spool grows to `max_spool` records; past that the oldest are dropped, counted in
    `dropped`, and logged at most once a minute. Every other record is written exactly once when the database
    comes back. The database methods (`grant`, `balances`, `usage`) raise Unavailable (503) while it is down.
    """

    def __init__(self, url: str, *, batch_size: int = 500, flush_interval_s: float = 0.5,
                 max_spool: int = 100_000, timeout_s: float = 10.0) -> None:
        if batch_size < 1 or max_spool < 1 or flush_interval_s <= 0 or timeout_s <= 0:
            raise ValueError("batch_size, max_spool, flush_interval_s and timeout_s must be positive")
        self._url = sa.make_url(url)
        self._dialect = self._url.get_backend_name()
        if self._dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"usage store URLs are sqlite+aiosqlite:// or postgresql+asyncpg://, not {self._dialect}")
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._max_spool = max_spool
        self._timeout_s = timeout_s  # each transaction's bound: a hung connection is a failed flush

        insert = sqlite_insert if self._dialect == "sqlite" else postgresql_insert
        self._insert_usage = insert(USAGE_RECORDS).on_conflict_do_nothing(index_elements=["request_id"]).returning(
            USAGE_RECORDS.c.key_id, USAGE_RECORDS.c.cost_nano_usd
        )
        spend = insert(CREDIT_SPEND)
        self._add_spend = spend.on_conflict_do_update(
            index_elements=["key_id"],
            set_={"spent_nano_usd": CREDIT_SPEND.c.spent_nano_usd + spend.excluded.spent_nano_usd},
        )

        self._engine: AsyncEngine | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._flush_lock: asyncio.Lock | None = None  # one writer of the spool at a time
        self._migrated = False
        self._closing = False
        self._closed = False
        self._healthy = True

        # The spool: (sequence number, row), oldest first. A batch in flight stays in it until committed.
        self._spool: deque[tuple[int, _Row]] = deque()
        self._seq = 0
        self._pending: dict[str, int] = {}  # key_id -> cost of its spooled rows
        self._written: dict[str, int] = {}  # key_id -> cost written since the last balances() began
        self._dropped = 0
        self._drop_logged_at = -math.inf
        self._inflight_last = 0  # sequence number of the last row of the batch in flight (0: none)
        self._dropped_inflight = 0  # rows of that batch dropped from the spool while it was written

    # ------------------------------------------------------------ metrics

    @property
    def healthy(self) -> bool:
        """The last flush (or migration) succeeded."""
        return self._healthy

    @property
    def spooled(self) -> int:
        return len(self._spool)

    @property
    def dropped(self) -> int:
        """Records lost because the spool was full (a dropped record that a flush in flight wrote after all is
        taken back off this count)."""
        return self._dropped

    def pending_cost(self, key_id: str) -> int:
        """The cost of this replica's records of `key_id` that the last `balances()` did not see: those not yet
        written, and those written since that read began. A replica's view of a key's spend is the spend of
        its last `balances()` plus this (never less than the truth: a write during the read counts twice)."""
        return self._pending.get(key_id, 0) + self._written.get(key_id, 0)

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Opens the database, migrates it to the last revision and starts the flusher. An unreachable database
        fails nothing: it is logged, records spool, and the flusher migrates once the database answers."""
        if self._engine is not None:
            return
        self._engine = _create_engine(self._url, self._timeout_s)
        self._wakeup = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        try:
            await asyncio.wait_for(self._ensure_migrated(), self._timeout_s)
        except Exception as exc:  # the database is down or slow: keep going, the flusher retries
            self._note_failure(exc)
        self._task = asyncio.create_task(self._run(), name="usage-store-flusher")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Writes what is spooled, waiting at most `timeout_s`, then lets go of the database. Records still
        spooled after that, or recorded after close, are not written (the count is logged)."""
        if self._closed:
            return
        self._closing = self._closed = True
        if self._task is not None and self._wakeup is not None:
            self._wakeup.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except asyncio.TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._spool:
            logger.error("usage store closed with %d records unwritten", len(self._spool))
        if self._engine is not None:
            await self._engine.dispose()

    # ------------------------------------------------------------ the request path

    def record(self, rec: UsageRecord) -> None:
        """Spools one request's usage for the flusher. Synchronous and cheap; never raises. When the spool
        holds `max_spool` records the oldest is dropped (counted in `dropped`, logged at most once a minute).
        Call it on the event loop that started the store."""
        try:
            row = _row(rec)
            while len(self._spool) >= self._max_spool:
                self._drop_oldest()
            self._seq += 1
            self._spool.append((self._seq, row))
            if row.cost_nano_usd:
                self._pending[row.key_id] = self._pending.get(row.key_id, 0) + row.cost_nano_usd
            if len(self._spool) >= self._batch_size and self._wakeup is not None:
                self._wakeup.set()
        except Exception:  # a bad record must not fail the request it describes
            logger.exception("usage record refused: %r", rec)

    def _drop_oldest(self) -> None:
        seq, row = self._spool.popleft()
        self._unpend(row)
        self._dropped += 1
        if seq <= self._inflight_last:
            self._dropped_inflight += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= _DROP_LOG_INTERVAL_S:
            self._drop_logged_at = now
            logger.error("usage spool full (%d records, database unavailable?): dropping the oldest; %d dropped "
                         "so far", self._max_spool, self._dropped)

    def _unpend(self, row: _Row) -> None:
        if row.cost_nano_usd:
            left = self._pending.get(row.key_id, 0) - row.cost_nano_usd
            if left > 0:
                self._pending[row.key_id] = left
            else:
                self._pending.pop(row.key_id, None)

    # ------------------------------------------------------------ the flusher

    async def _run(self) -> None:
        failures = 0
        while True:
            if failures:
                await asyncio.sleep(_backoff_s(failures))
            elif not self._closing:
                await self._wait_for_work()
            if self._closing and not self._spool:
                return
            failures = 0 if await self.flush() else failures + 1

    async def _wait_for_work(self) -> None:
        assert self._wakeup is not None
        self._wakeup.clear()
        if len(self._spool) >= self._batch_size or self._closing:
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
        except asyncio.TimeoutError:
            pass

    async def flush(self) -> bool:
        """Writes the spool now, batch by batch (the flusher does this on its own); False at the first failure,
        whose rows stay first in the spool for the next try."""
        if self._flush_lock is None:
            raise RuntimeError("the usage store is not running: start() it first")
        async with self._flush_lock:
            return await self._flush()

    async def _flush(self) -> bool:
        try:
            if not self._migrated:
                await asyncio.wait_for(self._ensure_migrated(), self._timeout_s)
            while self._spool:
                await self._write_batch()
        except Exception as exc:  # an outage, a timeout or a bug alike: the rows stay and are retried
            self._note_failure(exc)
            return False
        if not self._healthy:
            logger.warning("usage database reachable again; usage records are being written")
        self._healthy = True
        return True

    async def _write_batch(self) -> None:
        batch = list(itertools.islice(self._spool, self._batch_size))
        last_seq = batch[-1][0]
        self._inflight_last, self._dropped_inflight = last_seq, 0
        try:
            await asyncio.wait_for(self._write([row._asdict() for _, row in batch]), self._timeout_s)
            while self._spool and self._spool[0][0] <= last_seq:
                row = self._spool.popleft()[1]
                self._unpend(row)
                if row.cost_nano_usd:
                    self._written[row.key_id] = self._written.get(row.key_id, 0) + row.cost_nano_usd
            self._dropped -= self._dropped_inflight  # dropped from the spool, written all the same
        finally:
            self._inflight_last, self._dropped_inflight = 0, 0

    async def _write(self, rows: list[dict[str, Any]]) -> None:
        assert self._engine is not None
        async with self._engine.begin() as conn:
            inserted = await conn.execute(self._insert_usage, rows)
            spent: dict[str, int] = {}
            for key_id, cost in inserted:  # only rows new to the table: a retried batch charges nothing twice
                if cost:
                    spent[key_id] = spent.get(key_id, 0) + cost
            if spent:
                # In key order, so two replicas charging the same keys lock their rows in one order (no deadlock).
                await conn.execute(self._add_spend, [{"key_id": k, "spent_nano_usd": spent[k]} for k in sorted(spent)])

    def _note_failure(self, exc: BaseException) -> None:
        if self._healthy:  # once per outage
            logger.error("usage database unavailable (%s): %d usage records spooled, retrying with backoff",
                         _describe(exc), len(self._spool))
        self._healthy = False

    async def _ensure_migrated(self) -> None:
        assert self._engine is not None
        async with _alembic_lock():
            if self._migrated:
                return
            await migrate(self._engine)
            self._migrated = True

    # ------------------------------------------------------------ credit and usage, read from the database

    async def _database(self, work: Callable[[], Awaitable[T]]) -> T:
        """Runs one unit of database work within the timeout; a database that fails it is a 503."""
        if self._engine is None or self._closed:
            raise RuntimeError("the usage store is not running: start() it first")
        try:
            if not self._migrated:
                await asyncio.wait_for(self._ensure_migrated(), self._timeout_s)
            return await asyncio.wait_for(work(), self._timeout_s)
        except ServeAppError:
            raise
        except Exception as exc:
            logger.warning("usage database call failed: %s", _describe(exc))
            raise Unavailable("usage and credit are unavailable for a moment; retry shortly") from exc

    async def grant(self, key_id: str, amount_nano_usd: int, note: str = "") -> int:
        """Adds credit to a key (a negative amount corrects an earlier grant); returns the key's total granted."""
        if not isinstance(key_id, str) or not key_id or _text(key_id) != key_id:
            raise InvalidRequest("key_id must be a non-empty string of at most 256 characters", param="key_id")
        if type(amount_nano_usd) is not int or abs(amount_nano_usd) > _MAX_BIGINT:
            raise InvalidRequest("amount_nano_usd must be an integer", param="amount_nano_usd")

        async def work() -> int:
            assert self._engine is not None
            async with self._engine.begin() as conn:
                await conn.execute(sa.insert(CREDIT_GRANTS).values(
                    key_id=key_id, amount_nano_usd=amount_nano_usd, created_at_us=int(time.time() * 1_000_000),
                    note=_text(note),
                ))
                total = await conn.scalar(
                    sa.select(sa.func.coalesce(sa.func.sum(CREDIT_GRANTS.c.amount_nano_usd), 0))
                    .where(CREDIT_GRANTS.c.key_id == key_id)
                )
            return int(total)

        return await self._database(work)

    async def balances(self) -> dict[str, Balance]:
        """Every key with a grant or a spend: granted and spent from the database, two small grouped queries
        (the grants table and the one-row-per-key spend table; no usage rows are read)."""
        seen = dict(self._written)  # written before this read: in its answer, once it succeeds

        async def work() -> dict[str, Balance]:
            assert self._engine is not None
            async with self._engine.connect() as conn:
                granted = dict((await conn.execute(
                    sa.select(CREDIT_GRANTS.c.key_id, sa.func.sum(CREDIT_GRANTS.c.amount_nano_usd))
                    .group_by(CREDIT_GRANTS.c.key_id)
                )).tuples().all())
                spent = dict((await conn.execute(
                    sa.select(CREDIT_SPEND.c.key_id, CREDIT_SPEND.c.spent_nano_usd)
                )).tuples().all())
                held = (await conn.execute(
                    sa.select(_BATCH_HOLDS.c.owner, sa.func.sum(_BATCH_HOLDS.c.held_nano_usd))
                    .where(_BATCH_HOLDS.c.status.in_(ACTIVE_BATCH_STATUSES)).group_by(_BATCH_HOLDS.c.owner)
                )).tuples().all()
                for owner, amount in held:
                    spent[owner] = int(spent.get(owner, 0)) + int(amount or 0)
            return {key: Balance(int(granted.get(key, 0)), int(spent.get(key, 0))) for key in granted.keys() | spent}

        balances = await self._database(work)
        for key_id, cost in seen.items():
            left = self._written.get(key_id, 0) - cost
            if left > 0:
                self._written[key_id] = left
            else:
                self._written.pop(key_id, None)
        return balances

    async def usage(self, query: UsageQuery, key_ids: Sequence[str] | None = None) -> UsagePage:
        """One page of the Usage API. `key_ids` scopes it (None: every key; a list: only these, [] none), on top
        of the query's own `api_key_ids` filter."""
        window = query.window(time.time())
        keys = query.api_key_ids
        if key_ids is not None:
            scope = set(key_ids)
            keys = sorted(scope) if keys is None else [k for k in keys if k in scope]
        if window.count == 0 or keys == [] or query.models == []:
            return build_page(window, [], query.group_by)

        async def work() -> list[sa.Row]:
            assert self._engine is not None
            async with self._engine.connect() as conn:
                return list(await conn.execute(usage_select(USAGE_RECORDS, window, query.group_by, keys,
                                                            query.models)))

        return build_page(window, await self._database(work), query.group_by)

    async def usage_buckets(
        self, start_time: int, end_time: int | None, bucket_width: BucketWidth, group_by: list[GroupBy],
        limit: int | None, page: str | None, key_ids: list[str] | None = None, models: list[str] | None = None,
    ) -> UsagePage:
        """`usage` with the query's parameters as arguments; they are validated as the route's are (pydantic's
        ValidationError for a bad one)."""
        query = UsageQuery(start_time=start_time, end_time=end_time, bucket_width=bucket_width, group_by=group_by,
                           limit=limit, page=page, models=models)
        return await self.usage(query, key_ids)
