"""Per-key rate limits on the `limits` library's sliding-window counter, shared through Redis between ingress
replicas, with a conservative local fallback while Redis is away.

Why the sliding-window counter: two counters per key and limit whatever the cost (tokens per minute add
thousands a request; the moving window would keep one entry per unit). A hit that would pass the limit is
refused whole and counts nothing.

In Redis, all of one request's limits (requests, tokens, images, and what earlier requests of the key give back)
are taken in one round trip by one Lua script (`HIT_MANY`, LiteLLM's lesson): the library's own calls cost two
round trips per limit (take, then read the window for the headers), a millisecond of the ingress's CPU a
request. The script keeps the library's arithmetic (`acquire_sliding_window.lua`: the previous window weighted
by the share of it still inside the last minute, plus the current one); the local store is the library's.

Redis down (LiteLLM's known bug is the lesson: each replica falling back to the full limit admits N× the
limit): each replica counts locally with every limit divided by the number of ingress replicas, says so in
`clip_rate_limit_store_degraded` and one log line a minute, and probes Redis each second to go back to the
shared counters by itself. `fail_closed` refuses instead (503) for hosts that prefer that.
"""

import asyncio
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from serve_app.errors import Unavailable

logger = logging.getLogger("serve_app.tenancy")

# Bounds on a call to Redis: a Redis that hangs costs a request half a second, then the local counters answer.
REDIS_TIMEOUT_S = 0.5
PROBE_INTERVAL_S = 1.0
DEGRADED_LOG_INTERVAL_S = 60.0
EXPIRY_S = 60  # every limit is per minute

# KEYS: per limit, its previous and current window's counter. ARGV: the window in ms, then per limit its limit,
# the cost to take (all limits' or none) and what to give back first. Returns 1/0, then per limit the previous
# count, its ms to live, the current count and its ms to live (the current counter lives two windows).
HIT_MANY = """
local expiry = tonumber(ARGV[1])
local n = #KEYS / 2
local windows = {}
local fits = 1
for i = 1, n do
  local previous, current = KEYS[2 * i - 1], KEYS[2 * i]
  local limit, cost, back = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local current_ttl = tonumber(redis.call('pttl', current))
  if current_ttl > 0 and current_ttl < expiry then
    redis.call('rename', current, previous)
    redis.call('set', current, 0, 'PX', current_ttl + expiry)
  end
  if back > 0 and redis.call('exists', current) == 1 then
    local left = tonumber(redis.call('decrby', current, back))
    if left < 0 then redis.call('set', current, 0, 'KEEPTTL') end
  elseif back < 0 then  -- use beyond a reservation: counted even past the limit
    if redis.call('exists', current) == 1 then
      redis.call('incrby', current, -back)
    else
      redis.call('set', current, -back, 'PX', expiry * 2)
    end
  end
  local pc = tonumber(redis.call('get', previous)) or 0
  local pt = math.max(tonumber(redis.call('pttl', previous)), 0)
  local cc = tonumber(redis.call('get', current)) or 0
  local ct = math.max(tonumber(redis.call('pttl', current)), 0)
  if cost > 0 and (cost > limit or math.floor(pc * pt / expiry) + cc + cost > limit) then fits = 0 end
  windows[i] = {pc, pt, cc, ct, cost}
end
local out = {fits}
for i = 1, n do
  local w = windows[i]
  if fits == 1 and w[5] > 0 then
    if w[4] > 0 then
      w[3] = tonumber(redis.call('incrby', KEYS[2 * i], w[5]))
    else
      redis.call('set', KEYS[2 * i], w[5], 'PX', expiry * 2)
      w[3], w[4] = w[5], expiry * 2
    end
  end
  table.insert(out, w[1]); table.insert(out, w[2]); table.insert(out, w[3]); table.insert(out, w[4])
end
return out
"""


class _Pipelined:
    """Concurrent calls of one script in one round trip: the first call goes at once; calls made while a round
    trip is in flight wait for it and go together in the next, as one pipeline. A lone request waits for
    nothing; under load the client's cost per call (redis-py's, most of a call's) is shared by the batch."""

    def __init__(self, client: aioredis.Redis, script: Any) -> None:
        self._client = client
        self._script = script
        self._queue: list[tuple[list[str], list[int], asyncio.Future]] = []
        self._busy = False
        self._drainer: asyncio.Task | None = None  # held: a task nothing references may be collected

    async def __call__(self, keys: list[str], args: list[int]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, future))
        if not self._busy:
            self._busy = True
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _send(self, batch: list[tuple[list[str], list[int], asyncio.Future]]) -> list[Any]:
        """One round trip of EVALSHAs (redis-py's pipelined Script asks SCRIPT EXISTS first: a second one);
        a server that lost its scripts (restarted) gets the script once and the batch again."""
        for attempt in (1, 2):
            async with self._client.pipeline(transaction=False) as pipe:
                for keys, args, _ in batch:
                    pipe.evalsha(self._script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                await self._client.script_load(self._script.script)
                continue
            return results
        return results

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    results = await self._send(batch)
                except Exception as exc:  # the round trip failed: every call in it did
                    results = [exc] * len(batch)
                for (_, _, future), result in zip(batch, results):
                    if future.done():  # its request was cancelled
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._busy = False


@dataclass(frozen=True)
class Want:
    """One limit of a request: take `cost` of it (all of a call's or none), after giving `back` what earlier
    requests held beyond their use (negative: what they used beyond what they held, counted whatever the limit)."""

    kind: str
    per_minute: int
    cost: int = 0
    back: int = 0


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
        self._shared: aioredis.Redis | None = None
        if redis_url:
            self._shared = aioredis.Redis.from_url(
                redis_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
            )
            self._script = _Pipelined(self._shared, self._shared.register_script(HIT_MANY))
        self._replicas = max(1, replicas)
        self.fail_closed = fail_closed
        self.degraded = False
        self._probe: asyncio.Task | None = None
        self._last_log = -math.inf

    @property
    def store(self) -> str:
        return "memory" if self._shared is None else ("local-fallback" if self.degraded else "redis")

    async def hit_many(self, key_id: str, wants: list[Want]) -> tuple[bool, dict[str, Verdict]]:
        """Takes every want's cost of `key_id`'s limits, or none of them; returns whether they fitted and each
        limit's window after it (a refused want says when its cost would fit)."""
        if not wants:
            return True, {}
        if self._shared is not None and not self.degraded:
            try:
                return await self._hit_shared(key_id, wants)
            except Exception as exc:  # Redis gone, slow or failing: counted locally from here on
                self._fall_back(exc)
                # what was held in Redis is not given back to the local counters (it would add capacity)
                wants = [replace(w, back=min(w.back, 0)) for w in wants]
        elif self._shared is not None and self.fail_closed:
            raise Unavailable("Rate limits cannot be checked right now (their store is unreachable); retry later.")
        return await self._hit_local(key_id, wants)

    async def hit(self, per_minute: int, key_id: str, kind: str, cost: int) -> Verdict:
        """One limit: takes `cost` if it fits; a negative cost gives back."""
        want = Want(kind, per_minute, max(cost, 0), max(-cost, 0))
        _, verdicts = await self.hit_many(key_id, [want])
        return verdicts[kind]

    async def _hit_shared(self, key_id: str, wants: list[Want]) -> tuple[bool, dict[str, Verdict]]:
        keys, args = [], [EXPIRY_S * 1000]
        for want in wants:
            # one hash tag per key id: a key's counters share a Redis Cluster slot (a script touches one slot)
            base = f"clip:{{{key_id}}}:{want.kind}:{want.per_minute}"
            keys += [base + ":previous", base + ":current"]
            args += [want.per_minute, want.cost, want.back]
        out = await self._script(keys=keys, args=args)
        fits = bool(int(out[0]))
        verdicts = {}
        for i, want in enumerate(wants):
            previous, previous_ttl, current, current_ttl = (int(v) for v in out[1 + 4 * i: 5 + 4 * i])
            verdicts[want.kind] = _verdict(fits, want.per_minute, want.cost, previous, previous_ttl / 1000, current,
                                           current_ttl / 1000)
        return fits, verdicts

    async def _hit_local(self, key_id: str, wants: list[Want]) -> tuple[bool, dict[str, Verdict]]:
        """The library's memory store; one event loop, so testing all and then taking all is atomic."""
        limiter = SlidingWindowCounterRateLimiter(self._local)
        items = {w.kind: RateLimitItemPerMinute(self._local_limit(w.per_minute)) for w in wants}
        for want in wants:
            if want.back < 0:  # use beyond a reservation: counted even past the limit, in the current window
                _, current = self._local.sliding_window_keys(items[want.kind].key_for(key_id, want.kind), EXPIRY_S,
                                                             time.time())
                await self._local.incr(current, EXPIRY_S * 2, -want.back)
            elif want.back > 0:
                await limiter.hit(items[want.kind], key_id, want.kind, cost=-want.back)
        fits = all(w.cost <= items[w.kind].amount for w in wants)
        for want in wants:
            if fits and want.cost > 0:
                fits = await limiter.test(items[want.kind], key_id, want.kind, cost=want.cost)
        verdicts = {}
        for want in wants:
            item = items[want.kind]
            if fits and want.cost > 0:
                await limiter.hit(item, key_id, want.kind, cost=want.cost)
            window = await self._local.get_sliding_window(item.key_for(key_id, want.kind), item.get_expiry())
            verdicts[want.kind] = _verdict(fits, item.amount, want.cost, *window)
        return fits, verdicts

    def _local_limit(self, per_minute: int) -> int:
        """One replica, the local default: the limit as configured; a fallback from Redis: its share of it."""
        return per_minute if self._shared is None else max(1, per_minute // self._replicas)

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
                back = bool(await self._shared.ping())  # type: ignore[union-attr]
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
        if self._shared is not None:
            await self._shared.aclose()


def _verdict(taken: bool, limit: int, cost: int, previous: int, previous_ttl: float, current: int,
             current_ttl: float, expiry: float = 60.0) -> Verdict:
    """Remaining, reset and retry times from the two counters, as the sliding-window counter weighs them.
    `taken`: the call's costs were taken; when they were not, this limit's verdict says whether its own cost
    would have fitted (the refused call names the limit that did not)."""
    weighted = previous * previous_ttl / expiry + current
    # as the script counts (integer milliseconds), so that a verdict never disagrees with Redis's
    used = math.floor(previous * round(previous_ttl * 1000) / round(expiry * 1000)) + current
    allowed = taken or cost <= 0 or (cost <= limit and used + cost <= limit)
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
