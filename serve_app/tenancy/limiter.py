"""Per-key rate limits on the `limits` library's sliding-window counter, shared through Redis between ingress
replicas, with a conservative local fallback while Redis is away.

Why the sliding-window counter: two counters per key and limit whatever the cost (tokens per minute add
thousands a request; the moving window would keep one entry per unit). A hit that would pass the limit is
refused whole and counts nothing.

Redis down (LiteLLM's known bug is the lesson: each replica falling back to the full limit admits N× the
limit): each replica counts locally with every limit divided by the number of ingress replicas, says so in
`clip_rate_limit_store_degraded` and one log line a minute, and probes Redis each second to go back to the
shared counters by itself. `fail_closed` refuses instead (503) for hosts that prefer that.
"""

import asyncio
import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from serve_app.errors import Unavailable

logger = logging.getLogger("serve_app.tenancy")

# Bounds on a call to Redis: a Redis that hangs costs a request half a second, then the local counters answer.
REDIS_TIMEOUT_S = 0.5
PROBE_INTERVAL_S = 1.0
DEGRADED_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class Window:
    """One limit's state after a hit or a look, as OpenAI's headers and error messages state it."""

    limit: int
    remaining: int
    reset_s: float  # until the window frees enough for `remaining` to grow
    used: int


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    window: Window
    retry_after_s: float = 0.0  # when refused: until `cost` would fit


class RateLimiter:
    """`hit(limit, key_id, kind, cost)` on the shared store, or on the local one (with the limit divided by
    `replicas`) while the shared one fails."""

    def __init__(self, redis_url: str | None, replicas: int = 1, fail_closed: bool = False) -> None:
        self._local = MemoryStorage()
        self._shared: RedisStorage | None = None
        if redis_url:
            self._shared = RedisStorage(
                "async+" + redis_url, implementation="redispy", wrap_exceptions=True, key_prefix="clip",
                socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            )
        self._replicas = max(1, replicas)
        self.fail_closed = fail_closed
        self.degraded = False
        self._probe: asyncio.Task | None = None
        self._last_log = -math.inf

    @property
    def store(self) -> str:
        return "memory" if self._shared is None else ("local-fallback" if self.degraded else "redis")

    async def hit(self, per_minute: int, key_id: str, kind: str, cost: int) -> Verdict:
        """Takes `cost` of `key_id`'s `kind` limit if it fits (all or nothing); a negative cost gives back."""
        storage, limit = self._choose(per_minute)
        item = RateLimitItemPerMinute(limit)
        try:
            allowed = await SlidingWindowCounterRateLimiter(storage).hit(item, key_id, kind, cost=cost) \
                if cost != 0 else True
            window = await storage.get_sliding_window(item.key_for(key_id, kind), item.get_expiry())
        except Exception as exc:  # the limits library wraps the store's errors; anything from Redis counts
            if storage is self._local:
                raise
            self._fall_back(exc)
            return await self.hit(per_minute, key_id, kind, cost)
        return _verdict(allowed, limit, cost, *window)

    async def look(self, per_minute: int, key_id: str, kind: str) -> Window:
        return (await self.hit(per_minute, key_id, kind, 0)).window

    def _choose(self, per_minute: int) -> tuple[object, int]:
        if self._shared is not None and not self.degraded:
            return self._shared, per_minute
        if self._shared is not None and self.fail_closed:
            raise Unavailable("Rate limits cannot be checked right now (their store is unreachable); retry later.")
        if self._shared is None:  # one replica, the local default: the limit as configured
            return self._local, per_minute
        return self._local, max(1, per_minute // self._replicas)

    def _fall_back(self, exc: Exception) -> None:
        if not self.degraded:
            self.degraded = True
            self._last_log = -math.inf
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())
        now = time.monotonic()
        if now - self._last_log >= DEGRADED_LOG_INTERVAL_S:
            self._last_log = now
            logger.warning("rate limits: Redis unreachable (%s); counting locally with each limit divided by %d "
                           "ingress replicas%s", type(exc).__name__, self._replicas,
                           " (refusing: fail_closed)" if self.fail_closed else "")
        if self.fail_closed:
            raise Unavailable("Rate limits cannot be checked right now (their store is unreachable); retry later.")

    async def _probe_until_back(self) -> None:
        while self.degraded:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                back = await self._shared.check()  # type: ignore[union-attr]
            except Exception:
                back = False
            if back:
                self.degraded = False
                logger.warning("rate limits: Redis reachable again; shared counters in use")
            elif time.monotonic() - self._last_log >= DEGRADED_LOG_INTERVAL_S:
                self._last_log = time.monotonic()
                logger.warning("rate limits: Redis still unreachable; counting locally")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()


def _verdict(allowed: bool, limit: int, cost: int, previous: int, previous_ttl: float, current: int,
             current_ttl: float, expiry: float = 60.0) -> Verdict:
    """Remaining, reset and retry times from the two counters, as the sliding-window counter weighs them."""
    weighted = previous * previous_ttl / expiry + current
    used = math.floor(weighted)
    remaining = max(0, limit - used)
    # the weighted count falls as the previous window's share runs out: previous/expiry per second
    rate = previous / expiry
    resets = [previous_ttl % (expiry / previous)] if previous else []
    resets += [current_ttl % expiry] if current else []  # the current counter's key lives two windows
    reset = min(resets, default=0.0)
    retry = 0.0
    if not allowed:
        excess = weighted + cost - limit
        if rate > 0 and excess <= previous * previous_ttl / expiry:
            retry = excess / rate
        else:  # not before the current window becomes the previous one and has run down far enough
            fits = max(0.0, limit - cost)
            retry = current_ttl - expiry + max(0.0, expiry * (1 - fits / current)) if current else current_ttl
            retry = max(retry, 0.001)
    return Verdict(allowed, Window(limit, remaining, max(0.0, reset), used), retry)


def openai_duration(seconds: float) -> str:
    """A duration as OpenAI's rate-limit headers write it (Go's): `12ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    seconds = round(seconds, 3)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text
