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
from dataclasses import dataclass, field, replace
from pathlib import Path

from serve_app import metrics
from serve_app.config import Price, TenancySettings
from serve_app.errors import Forbidden, QuotaExceeded, RateLimited, Unauthorized
from serve_app.tenancy.keys import NANO, Key, KeyLimits, KeyRing, KeysFile
from serve_app.tenancy.limiter import RateLimiter, Verdict, Want, Window, openai_duration
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


# Only ASCII whitespace is free: other characters Python calls whitespace (U+0085, U+2028, …) become tokens once
# open_clip's cleaning (ftfy) has rewritten them.
ASCII_SPACE = (b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c")


def token_bound(text: str, context_length: int) -> int:
    """At least the tokens open_clip counts for `text` (both specials included), without tokenizing: every
    other token holds at least one byte of the text's UTF-8 that is not whitespace, and at most
    `context_length` are kept. Ordinary captions come out a few times their real count: held for the
    request's duration only, then settled to the real count."""
    data = text.encode("utf-8", "surrogatepass")
    return min(context_length, 2 + len(data) - sum(map(data.count, ASCII_SPACE)))


def prompt_token_bound(labels: list[str], templates: tuple[str, ...], context_length: int) -> int:
    """`token_bound` summed over every prompt of `labels` × `templates`, without building the prompts."""
    if not labels:
        return 0
    import numpy as np

    def nonspace_bytes(text: str) -> int:
        data = text.encode("utf-8", "surrogatepass")
        return len(data) - sum(map(data.count, ASCII_SPACE))

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
    counted: bool = False  # the request was counted against its requests per minute
    held: int = 0  # nano-USD of the key's credit held while it runs (its bound's price)
    refused: bool = False  # by its key's limits or credit
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
        self._backs: dict[str, dict[str, int]] = {}  # key id → kind → held beyond use, to give back
        self._blocked: dict[str, tuple[float, Verdict]] = {}  # key id → (until, refusal) of its requests limit
        self._held: dict[str, int] = {}  # key id → nano-USD held by its requests in flight here

    @property
    def enabled(self) -> bool:
        """Keys are checked: some are configured, or a keys file is (then a file emptied of keys refuses
        everyone, it never opens the service). With neither the service is open and nothing is counted."""
        return self._file is not None or len(self.ring) > 0

    def _ring(self) -> KeyRing:
        return self._static.merged(self._file.ring) if self._file else self._static

    def ensure_started(self) -> None:
        """Starts the store and the watchers on the serving loop, once (the replica's constructor may run
        before its loop does)."""
        if self._started is None:
            # not awaited by requests: a database that hangs at start must not hold them (records spool meanwhile)
            self._started = asyncio.get_running_loop().create_task(self.start())

    async def start(self) -> None:
        await self.store.start()
        await self.refresh_balances()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_keys()), loop.create_task(self._watch_balances()),
                       loop.create_task(self._watch_backs())]

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
        """Before the body is read: credit left, and no refusal of the key's requests still running. The
        request itself is counted with its tokens and images (`reserve`), or as it is answered (`settle`):
        one round trip to Redis a request."""
        if tenant.key.admin:
            return
        left = self.remaining_credit(tenant.key)
        if left is not None and left <= 0:
            self._refused(tenant, "insufficient_quota")
            raise QuotaExceeded(
                "You exceeded your current quota: this key's credit is spent. Ask your provider to top it up."
            )
        blocked = self._blocked.get(tenant.key.id)
        if blocked is not None:
            until, refusal = blocked
            wait = until - time.monotonic()
            if wait > 0:  # refused a moment ago: refused again without a round trip or reading the body
                self._take(tenant, "requests", 1, Verdict(False, refusal.window, wait))
            del self._blocked[tenant.key.id]

    def _wants(self, tenant: Tenant, tokens: int, images: int, count_request: bool) -> list[Want]:
        limits = tenant.key.limits
        backs = self._backs.pop(tenant.key.id, {})
        if self.limiter.degraded:  # held in Redis: giving it back to the local counters would add capacity
            backs = {kind: amount for kind, amount in backs.items() if amount < 0}
        wants = []
        for kind, per_minute, cost in (("requests", limits.requests_per_minute, 1 if count_request else 0),
                                       ("tokens", limits.tokens_per_minute, tokens),
                                       ("images", limits.images_per_minute, images)):
            if per_minute is not None:
                wants.append(Want(kind, per_minute, cost, backs.get(kind, 0)))
        return wants

    async def reserve(self, tenant: Tenant, tokens: int, images: int, model: str = "") -> None:
        """Counts the request and holds its bound of tokens and its images against the key's limits, all or
        nothing, before any work; and the bound's price against its credit (what requests in flight on this
        replica hold counts as spent), so that concurrent requests cannot spend far below zero."""
        if tenant.key.admin or tenant.counted:
            return
        left = self.remaining_credit(tenant.key)
        if left is not None:
            bound = price_of(self.settings.prices.get(model, self.settings.price), tokens, images)
            if bound > left - self._held.get(tenant.key.id, 0):
                self._refused(tenant, "insufficient_quota")
                error = QuotaExceeded(
                    f"You exceeded your current quota: this request may cost up to ${bound / NANO:.6f} and the key "
                    f"has ${max(left, 0) / NANO:.6f} left (requests in flight included). Ask your provider to top "
                    "it up, or send less per request.")
                raise error
            tenant.held = bound
            self._held[tenant.key.id] = self._held.get(tenant.key.id, 0) + bound
        wants = self._wants(tenant, tokens, images, count_request=True)
        fits, verdicts = await self.limiter.hit_many(tenant.key.id, wants)
        tenant.counted = True
        for kind, verdict in verdicts.items():
            tenant.windows[kind] = verdict.window
        if fits:
            tenant.reserved = {"tokens": tokens, "images": images}
            return
        kind = next((w.kind for w in wants if w.cost > 0 and not verdicts[w.kind].allowed),
                    next(w.kind for w in wants if w.cost > 0))
        cost = {"requests": 1, "tokens": tokens, "images": images}[kind]
        self._take(tenant, kind, cost, verdicts[kind])

    def _take(self, tenant: Tenant, kind: str, cost: int, verdict: Verdict) -> None:
        tenant.windows[kind] = verdict.window
        if verdict.allowed:
            return
        window = verdict.window
        if kind == "requests":
            self._blocked[tenant.key.id] = (time.monotonic() + verdict.retry_after_s, verdict)
        self._refused(tenant, f"rate_limited_{kind}")
        if cost > window.limit:  # no wait makes it fit: retrying is pointless, and says so
            error = RateLimited(
                f"Request too large for {tenant.key.id} on {KIND_NAMES[kind]}: Limit {window.limit}, Requested "
                f"{cost}. Send less per request.", kind=kind)
            error.headers = {**self.headers(tenant), "x-should-retry": "false"}
            raise error
        error = RateLimited(
            f"Rate limit reached for {tenant.key.id} on {KIND_NAMES[kind]}: Limit {window.limit}, Used "
            f"{window.used}, Requested {cost}. Please try again in {openai_duration(verdict.retry_after_s)}.",
            kind=kind,
        )
        error.retry_after_s = verdict.retry_after_s
        error.headers = self.headers(tenant)
        raise error

    async def settle(self, tenant: Tenant) -> list[tuple[bytes, bytes]]:
        """The answer's rate-limit headers. A reservation becomes what was used without a round trip: the
        excess is given back with the key's next call to the store (or within a second, `_watch_backs`), and
        the headers count it as given back already."""
        if tenant.settled or tenant.key.admin:
            return _encode(self.headers(tenant))
        tenant.settled = True
        if not tenant.counted:  # answered without a reservation (GET routes, a refused body): counted now
            tenant.counted = True
            wants = self._wants(tenant, 0, 0, True)
            fits, verdicts = await self.limiter.hit_many(tenant.key.id, wants)
            for kind, verdict in verdicts.items():
                tenant.windows[kind] = verdict.window
            if not fits and "requests" in verdicts:  # over: its next requests are refused before their body
                self._blocked[tenant.key.id] = (time.monotonic() + verdicts["requests"].retry_after_s,
                                                verdicts["requests"])
            return _encode(self.headers(tenant))
        used = {"tokens": tenant.tokens, "images": tenant.images}
        backs = self._backs.setdefault(tenant.key.id, {})
        for kind in ("tokens", "images"):
            # held beyond use goes back; use beyond what was held (a bound that was not one) is added, limit or
            # not, so that the key's next requests pay for it
            excess = tenant.reserved.get(kind, 0) - used[kind]
            window = tenant.windows.get(kind)
            if excess and window is not None:
                backs[kind] = backs.get(kind, 0) + excess
                tenant.windows[kind] = replace(window, remaining=max(0, min(window.limit, window.remaining + excess)),
                                               used=max(0, window.used - excess))
        if not any(backs.values()):
            self._backs.pop(tenant.key.id, None)
        return _encode(self.headers(tenant))

    async def _watch_backs(self) -> None:
        """Gives back, each second, what finished requests held beyond their use and no later request of their
        key has carried to the store yet."""
        while True:
            await asyncio.sleep(1.0)
            for key_id in list(self._backs):
                key = self.ring.keys.get(key_id)
                if key is None:
                    self._backs.pop(key_id, None)
                    continue
                tenant = Tenant(key, "", "")
                try:
                    await self.limiter.hit_many(key_id, self._wants(tenant, 0, 0, False))
                except Exception as exc:
                    logger.debug("rate-limit give-back of %s failed: %s", key_id, exc)

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
        """The usage record (off the request's path: the store writes in batches) and per-key metrics. What the
        encoders did is billed whatever the answer's status (a request that failed after its work still cost
        it); a refusal by the key's own limits or credit, which did no work, writes no record."""
        if tenant.held:
            left = self._held.get(tenant.key.id, 0) - tenant.held
            if left > 0:
                self._held[tenant.key.id] = left
            else:
                self._held.pop(tenant.key.id, None)
            tenant.held = 0
        if tenant.key.admin:
            return
        metrics.count_key_request(self._metric_id(tenant.key.id), status, tenant.tokens, tenant.images)
        if tenant.refused and not (tenant.tokens or tenant.images):
            return
        model = tenant.model or ""
        price = self.settings.prices.get(model, self.settings.price)
        cost = price_of(price, tenant.tokens, tenant.images)
        try:
            self.store.record(UsageRecord(
                request_id=tenant.request_id, key_id=tenant.key.id, model=model, route=tenant.route,
                input_tokens=tenant.tokens, images=tenant.images, status=status, cost_nano_usd=cost,
                created_at=time.time(),
            ))
        except Exception:  # the answer is sent: a record that cannot be made is logged, never the client's error
            logger.exception("usage of request %s not recorded", tenant.request_id)

    def _refused(self, tenant: Tenant, reason: str) -> None:
        tenant.refused = True
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
