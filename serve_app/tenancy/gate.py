"""What the ingress's one middleware asks of tenancy for each request: whose key it is, whether its limits and
credit let it in, what it may cost before it runs, what it did cost, and the record a host bills from.

A request's path through here:
1. `authenticate`: the key from `Authorization: Bearer`, by the hash of the token (401 unknown; 403 an ordinary
   key on the admin routes, or an admin key on the API).
2. `admit`: credit left (else 429 `insufficient_quota`) and one request of its requests per minute.
3. `reserve` (from the route, once the body is parsed, before any work): an upper bound of its text tokens
   (`token_bound`, no tokenizing) and its images against the per-minute limits, all or nothing.
4. `used` (from `ClipService.embed`): what the encoders really did, tokens as `usage` counts them.
5. `settle` (as the answer starts): the reservation's excess given back, OpenAI's rate-limit headers.
6. `finish`: the usage record (cost from the price table) and the per-key metrics.
"""

import asyncio
import logging
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from serve_app import metrics
from serve_app.config import Price, TenancySettings
from serve_app.errors import Forbidden, QuotaExceeded, RateLimited, Unauthorized
from serve_app.tenancy.keys import NANO, Key, KeyLimits, KeyRing, KeysFile
from serve_app.tenancy.limiter import RateLimiter, Verdict, Window, openai_duration
from serve_app.tenancy.metering import UsageRecord, UsageStore

logger = logging.getLogger("serve_app.tenancy")

ENV_KEYS_FILE = "CLIP_KEYS_FILE"
ENV_REDIS_URL = "CLIP_REDIS_URL"
ENV_DATABASE_URL = "CLIP_DATABASE_URL"

ADMIN_PREFIX = "/v1/organization/"
KINDS = ("requests", "tokens", "images")
KIND_NAMES = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)",
              "images": "images per min (IPM)"}


def default_database_url() -> str:
    """The local default: SQLite in the user's data directory (no server to run)."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "clip-serve"
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{base / 'usage.db'}"


def token_bound(text: str, context_length: int) -> int:
    """At least the tokens open_clip counts for `text` (both specials included), without tokenizing: every
    other token holds at least one byte of the text's UTF-8 that is not whitespace, and at most
    `context_length` are kept. Ordinary captions come out a few times their real count: held for the
    request's duration only, then settled to the real count."""
    return min(context_length, 2 + len("".join(text.split()).encode("utf-8", "surrogatepass")))


def prompt_token_bound(labels: list[str], templates: tuple[str, ...], context_length: int) -> int:
    """`token_bound` summed over every prompt of `labels` × `templates`, without building the prompts."""
    if not labels:
        return 0
    import numpy as np

    def nonspace_bytes(text: str) -> int:
        return len("".join(text.split()).encode("utf-8", "surrogatepass"))

    label_bytes = np.fromiter((nonspace_bytes(x) for x in labels), dtype=np.int64, count=len(labels))
    template_bytes = np.fromiter((nonspace_bytes(t.replace("{}", "")) for t in templates), dtype=np.int64,
                                 count=len(templates))
    bounds = np.minimum(context_length, 2 + label_bytes[:, None] + template_bytes[None, :])
    return int(bounds.sum())


@dataclass
class Tenant:
    """One request's key and what it has reserved and used."""

    key: Key
    route: str
    request_id: str
    windows: dict[str, Window] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)
    model: str | None = None
    tokens: int = 0
    images: int = 0
    settled: bool = False


CURRENT: ContextVar[Tenant | None] = ContextVar("clip_tenant", default=None)


def used(model: str, tokens: int, images: int) -> None:
    """What a request's encoders did, added to the request's tenant (no-op when tenancy is off)."""
    tenant = CURRENT.get()
    if tenant is not None:
        tenant.model = tenant.model or model
        tenant.tokens += tokens
        tenant.images += images


def price_of(price: Price, tokens: int, images: int) -> int:
    """nano-USD."""
    return round(tokens * price.usd_per_million_tokens * 1000 + images * price.usd_per_thousand_images * 1_000_000)


class Tenancy:
    """One ingress replica's view of the keys, the limits and the credit."""

    def __init__(self, settings: TenancySettings, static_keys: KeyRing, replicas: int = 1,
                 environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.settings = settings
        path = settings.keys_file or env.get(ENV_KEYS_FILE)
        self._file = KeysFile(path) if path else None
        self._static = static_keys
        self.ring = self._ring()
        self.limiter = RateLimiter(settings.redis_url or env.get(ENV_REDIS_URL), replicas, settings.fail_closed)
        self.store = UsageStore(settings.database_url or env.get(ENV_DATABASE_URL) or default_database_url())
        self._balances: dict[str, tuple[int, int]] = {}  # key id → (granted, spent) in the database, nano-USD
        self._metric_ids: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._started: asyncio.Task | None = None

    @property
    def enabled(self) -> bool:
        """Keys are checked: some are configured, or a keys file is (then a file emptied of keys refuses
        everyone, it never opens the service). With neither the service is open and nothing is counted."""
        return self._file is not None or len(self.ring) > 0

    def _ring(self) -> KeyRing:
        return self._static.merged(self._file.ring) if self._file else self._static

    async def ensure_started(self) -> None:
        """Starts the store and the watchers on the serving loop, once (the replica's constructor may run
        before its loop does)."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self.start())
        await asyncio.shield(self._started)

    async def start(self) -> None:
        await self.store.start()
        await self.refresh_balances()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_keys()), loop.create_task(self._watch_balances())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.limiter.close()
        await self.store.close()

    async def _watch_keys(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            if self._file is not None and await asyncio.to_thread(self._file.reload_if_changed):
                try:
                    self.ring = self._ring()
                except ValueError as exc:
                    logger.error("keys file not applied: %s", exc)

    async def _watch_balances(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.refresh_balances()
            metrics.set_tenancy_state(self.limiter.degraded, self.store.spooled, self.store.dropped)

    async def refresh_balances(self) -> None:
        """Every key's database grants and spend (other replicas' use included), at most a second old."""
        try:
            balances = await self.store.balances()
        except Exception as exc:  # the database is away: the last known balances stay
            logger.debug("balances not refreshed: %s", exc)
            return
        self._balances = {k: (b.granted_nano_usd, b.spent_nano_usd) for k, b in balances.items()}

    # ------------------------------------------------------------------ the request's path

    def authenticate(self, authorization: str | None, token: bytes | None, path: str, request_id: str) -> Tenant:
        key = self.ring.find(token)
        if key is None:
            error = Unauthorized("Incorrect API key provided" if authorization else
                                 "Missing API key: send `Authorization: Bearer <key>`")
            error.headers = {"WWW-Authenticate": "Bearer"}
            raise error
        tenant = Tenant(key, path, request_id)
        admin_route = path.startswith(ADMIN_PREFIX)
        if admin_route != key.admin:
            self._refused(tenant, "forbidden")
            raise Forbidden("This route needs an admin key" if admin_route else
                            "Admin keys reach /v1/organization/* only; use an ordinary key for the API")
        return tenant

    def remaining_credit(self, key: Key) -> int | None:
        """nano-USD left (None: no credit limit): the file's grant and the database's top-ups, less the
        database's spend and this replica's records not yet written."""
        if key.credit_nano_usd is None:
            return None
        granted, spent = self._balances.get(key.id, (0, 0))
        return key.credit_nano_usd + granted - spent - self.store.pending_cost(key.id)

    async def admit(self, tenant: Tenant) -> None:
        if tenant.key.admin:
            return
        left = self.remaining_credit(tenant.key)
        if left is not None and left <= 0:
            self._refused(tenant, "insufficient_quota")
            raise QuotaExceeded(
                "You exceeded your current quota: this key's credit is spent. Ask your provider to top it up."
            )
        limits = tenant.key.limits
        if limits.requests_per_minute is not None:
            verdict = await self.limiter.hit(limits.requests_per_minute, tenant.key.id, "requests", 1)
            self._take(tenant, "requests", 1, verdict)

    async def reserve(self, tenant: Tenant, tokens: int, images: int) -> None:
        """Holds the request's bound of tokens and its images against the key's limits before any work."""
        limits = tenant.key.limits
        wanted = {k: (per_minute, cost) for k, per_minute, cost in (
            ("tokens", limits.tokens_per_minute, tokens), ("images", limits.images_per_minute, images))
            if per_minute is not None}
        verdicts = await asyncio.gather(*(self.limiter.hit(pm, tenant.key.id, k, c) for k, (pm, c) in wanted.items()))
        refused = None
        for (kind, (_, cost)), verdict in zip(wanted.items(), verdicts):
            if verdict.allowed:
                tenant.reserved[kind] = cost
                tenant.windows[kind] = verdict.window
            elif refused is None:
                refused = (kind, cost, verdict)
        if refused is not None:
            await self._give_back(tenant)  # all or nothing: what was taken for the other kind returns
            self._take(tenant, *refused)

    def _take(self, tenant: Tenant, kind: str, cost: int, verdict: Verdict) -> None:
        tenant.windows[kind] = verdict.window
        if verdict.allowed:
            return
        window = verdict.window
        self._refused(tenant, f"rate_limited_{kind}")
        error = RateLimited(
            f"Rate limit reached for {tenant.key.id} on {KIND_NAMES[kind]}: Limit {window.limit}, Used "
            f"{window.used}, Requested {cost}. Please try again in {openai_duration(verdict.retry_after_s)}.",
            kind=kind,
        )
        error.retry_after_s = verdict.retry_after_s
        error.headers = self.headers(tenant)
        raise error

    async def _give_back(self, tenant: Tenant) -> None:
        limits = tenant.key.limits
        per_minute = {"tokens": limits.tokens_per_minute, "images": limits.images_per_minute}
        back = {k: v for k, v in tenant.reserved.items() if v}
        tenant.reserved = {}
        verdicts = await asyncio.gather(*(self.limiter.hit(per_minute[k], tenant.key.id, k, -v)
                                          for k, v in back.items()))
        for kind, verdict in zip(back, verdicts):
            tenant.windows[kind] = verdict.window

    async def settle(self, tenant: Tenant) -> list[tuple[bytes, bytes]]:
        """The reservation becomes what was used; the answer's rate-limit headers."""
        if tenant.settled:
            return _encode(self.headers(tenant))
        tenant.settled = True
        limits = tenant.key.limits
        per_minute = {"tokens": limits.tokens_per_minute, "images": limits.images_per_minute}
        actual = {"tokens": tenant.tokens, "images": tenant.images}
        jobs = {}
        for kind in ("tokens", "images"):
            if per_minute[kind] is None:
                continue
            # the bound held is at least what was used: the excess goes back (a negative hit always passes)
            delta = actual[kind] - tenant.reserved.get(kind, 0)
            jobs[kind] = self.limiter.hit(per_minute[kind], tenant.key.id, kind, delta)
        results = await asyncio.gather(*jobs.values())
        for kind, verdict in zip(jobs, results):
            tenant.windows[kind] = verdict.window
        return _encode(self.headers(tenant))

    def headers(self, tenant: Tenant) -> dict[str, str]:
        """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` and ours for images."""
        out = {}
        for kind in KINDS:
            window = tenant.windows.get(kind)
            if window is None:
                continue
            out[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(window.remaining)
            out[f"x-ratelimit-reset-{kind}"] = openai_duration(window.reset_s)
        return out

    def finish(self, tenant: Tenant, status: int) -> None:
        """The usage record (off the request's path: the store writes in batches) and per-key metrics."""
        if tenant.key.admin:
            return
        model = tenant.model or ""
        price = self.settings.prices.get(model, self.settings.price)
        cost = price_of(price, tenant.tokens, tenant.images) if 200 <= status < 300 else 0
        try:
            self.store.record(UsageRecord(
                request_id=tenant.request_id, key_id=tenant.key.id, model=model, route=tenant.route,
                input_tokens=tenant.tokens, images=tenant.images, status=status, cost_nano_usd=cost,
                created_at=time.time(),
            ))
            metrics.count_key_request(self._metric_id(tenant.key.id), status, tenant.tokens, tenant.images)
        except Exception:  # the answer is sent: a record that cannot be made is logged, never the client's error
            logger.exception("usage of request %s not recorded", tenant.request_id)

    def _refused(self, tenant: Tenant, reason: str) -> None:
        metrics.count_key_refusal(self._metric_id(tenant.key.id), reason)

    def _metric_id(self, key_id: str) -> str:
        """Key ids as metric labels, at most `max_metric_key_ids` of them per replica; the rest `other`."""
        if key_id in self._metric_ids:
            return key_id
        if len(self._metric_ids) < self.settings.max_metric_key_ids:
            self._metric_ids.add(key_id)
            return key_id
        return "other"

    # ------------------------------------------------------------------ admin

    def list_keys(self) -> list[dict]:
        out = []
        for key in sorted(self.ring.keys.values(), key=lambda k: k.id):
            left = self.remaining_credit(key)
            out.append({"object": "organization.api_key", **key.public(),
                        "credit_remaining_usd": None if left is None else left / NANO})
        return out

    async def top_up(self, key_id: str, amount_usd: float, note: str) -> float | None:
        """Adds credit to a key in the database (every replica sees it within a second)."""
        await self.store.grant(key_id, round(amount_usd * NANO), note)
        await self.refresh_balances()
        key = self.ring.keys.get(key_id)
        left = self.remaining_credit(key) if key else None
        return None if left is None else left / NANO


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


__all__ = ["CURRENT", "KeyLimits", "Tenancy", "Tenant", "token_bound", "used"]
