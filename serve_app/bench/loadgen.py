"""The load generator: asyncio + aiohttp against any OpenAI-compatible embeddings URL.

It shares the machine with the server it measures, so whatever CPU it spends per request is taken from that
server: it uses aiohttp's client, which costs several times less CPU per request than httpx's (BENCHMARKS.md,
"The load generator's own CPU"), and sends pre-serialised bodies.

Two ways to load a server, each bounded in time (warm-up + measurement window) and optionally in count:
- closed loop at a fixed concurrency: `c` workers, each sends its next request when the last one returns;
- open loop at a fixed rate: requests start on a fixed schedule whatever the server does, up to
  `max_inflight` at once (more are counted as `dropped`); latency is measured from the scheduled start,
  so a server that falls behind is not flattered by the client waiting for it (no coordinated omission).

Throughput is the steady-state rate inside the measurement window, without the ramp-up before it or the
drain after it: each successful request counts with the share of its lifetime (start to end) that lies inside
the window, divided by the window. Counting only the requests that *complete* in the window is quantised when
completions come in bursts (at concurrency 32 a batching server answers 32 requests at once, a few times per
window, so one burst more or less moves the rate by a whole batch); the shares do not jump (`items_per_s_completed`
keeps the plain count). Latency percentiles are over the
successful (2xx) requests completed in the window; every other outcome is counted by status code
(`"400"`, `"503"`) or by client error (`"timeout"`, `"ConnectError"`, `"bad-response"`).
"""

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from serve_app.bench.payloads import HttpRequest, PayloadKind
from serve_app.bench.report import latency_summary, loadavg, machine_info


@dataclass(frozen=True)
class Level:
    """One load level: a fixed concurrency (closed loop) or a fixed request rate in requests/s (open loop)."""

    concurrency: int | None = None
    rate: float | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("a level has either a concurrency or a rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")

    @property
    def label(self) -> str:
        return f"c={self.concurrency}" if self.concurrency is not None else f"rate={self.rate:g}/s"


@dataclass
class LoadSettings:
    duration_s: float = 15.0  # measurement window per level
    warmup_s: float = 2.0  # load before the window, not counted
    max_requests: int | None = None  # per level: the window closes early once this many completed in it
    timeout_s: float = 300.0  # per request
    max_inflight: int = 1024  # open loop only
    verify: bool = True  # 2xx bodies must be JSON with one `data` entry per item
    progress: bool = True
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Record:
    start: float
    end: float
    outcome: str  # HTTP status as text, or a client-side error name
    items: int


@dataclass
class LevelResult:
    concurrency: int | None
    rate: float | None
    window_s: float
    sent: int
    completed: int  # any outcome, in the window
    ok: int  # 2xx in the window
    items_ok: int
    requests_per_s: float
    items_per_s: float  # each ok request weighted by the share of its lifetime inside the window
    latency_ms: dict[str, float | None]
    status_counts: dict[str, int]  # every outcome in the window, 2xx included
    errors: dict[str, int]  # non-2xx outcomes in the window
    error_count: int
    dropped: int = 0
    first_ok_latency_ms: float | None = None  # the level's first successful request (cold caches show here)
    loadavg_before: list[float] | None = None
    loadavg_after: list[float] | None = None
    items_per_s_completed: float | None = None  # ok items that completed inside the window / window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_ok(outcome: str) -> bool:
    return outcome.isdigit() and 200 <= int(outcome) < 300


def _check_body(body: bytes, items: int) -> bool:
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    data = parsed.get("data") if isinstance(parsed, dict) else None
    return isinstance(data, list) and len(data) == items


async def _send(client: Any, url: str, request: HttpRequest, settings: LoadSettings) -> str:
    import aiohttp

    try:
        async with client.post(
            url, data=request.body, headers={"content-type": "application/json", **settings.headers}
        ) as response:
            outcome = str(response.status)
            body = await response.read()
    except asyncio.TimeoutError:
        return "timeout"
    except aiohttp.ClientConnectorError:
        return "ConnectError"
    except aiohttp.ClientError as exc:
        return type(exc).__name__
    if settings.verify and _is_ok(outcome) and request.path.endswith(("/embeddings", "/classify")):
        if not _check_body(body, request.items):
            return "bad-response"
    return outcome


def _summarise(
    level: Level, records: list[_Record], window: tuple[float, float], sent: int, dropped: int,
    load_before: list[float] | None,
) -> LevelResult:
    start, end = window
    inside = [r for r in records if start <= r.end <= end]
    ok = [r for r in inside if _is_ok(r.outcome)]
    counts = Counter(r.outcome for r in inside)
    errors = {k: v for k, v in counts.items() if not _is_ok(k)}
    span = max(end - start, 1e-9)
    all_ok = [r for r in records if _is_ok(r.outcome)]
    shares = [_share_inside(r, start, end) for r in all_ok]
    first_ok = min(all_ok, key=lambda r: r.end, default=None)
    return LevelResult(
        concurrency=level.concurrency,
        rate=level.rate,
        window_s=round(span, 3),
        sent=sent,
        completed=len(inside),
        ok=len(ok),
        items_ok=sum(r.items for r in ok),
        requests_per_s=sum(shares) / span,
        items_per_s=sum(r.items * share for r, share in zip(all_ok, shares)) / span,
        latency_ms=latency_summary([r.end - r.start for r in ok]),
        status_counts=dict(sorted(counts.items())),
        errors=dict(sorted(errors.items())),
        error_count=sum(errors.values()),
        dropped=dropped,
        first_ok_latency_ms=None if first_ok is None else (first_ok.end - first_ok.start) * 1000.0,
        loadavg_before=load_before,
        loadavg_after=loadavg(),
        items_per_s_completed=sum(r.items for r in ok) / span,
    )


def _share_inside(record: _Record, start: float, end: float) -> float:
    """The share of a request's lifetime that lies inside [start, end]."""
    life = record.end - record.start
    if life <= 0:
        return 1.0 if start <= record.end <= end else 0.0
    return max(0.0, min(record.end, end) - max(record.start, start)) / life


class _Progress:
    def __init__(self, enabled: bool, level: Level, settings: LoadSettings) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=settings.max_requests, desc=level.label, unit="req", leave=False, dynamic_ncols=True
            )
        self._ok = 0
        self._errors = 0

    def update(self, outcome: str) -> None:
        if self._bar is None:
            return
        if _is_ok(outcome):
            self._ok += 1
        else:
            self._errors += 1
        self._bar.update(1)
        self._bar.set_postfix(ok=self._ok, errors=self._errors, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_level(client: Any, base_url: str, payload: PayloadKind, level: Level, settings: LoadSettings) -> LevelResult:
    """Loads the server at one level for warm-up + window; returns what completed inside the window."""
    payload.prepare()
    load_before = loadavg()
    records: list[_Record] = []
    counter = itertools.count()
    t0 = time.perf_counter()
    window_start = t0 + settings.warmup_s
    window_end = window_start + settings.duration_s
    done = asyncio.Event()
    in_window = 0
    progress = _Progress(settings.progress, level, settings)

    def record(start: float, outcome: str, items: int) -> None:
        nonlocal window_end, in_window
        end = time.perf_counter()
        records.append(_Record(start, end, outcome, items))
        progress.update(outcome)
        if window_start <= end <= window_end:
            in_window += 1
            if settings.max_requests is not None and in_window >= settings.max_requests:
                window_end = end
                done.set()

    async def one(index: int, scheduled: float) -> None:
        request = payload.request(index)
        outcome = await _send(client, base_url + request.path, request, settings)
        record(scheduled, outcome, request.items)

    sent = dropped = 0
    try:
        if level.concurrency is not None:
            async def worker() -> None:
                nonlocal sent
                while not done.is_set() and time.perf_counter() < window_end:
                    sent += 1
                    await one(next(counter), time.perf_counter())

            await asyncio.gather(*(worker() for _ in range(level.concurrency)))
        else:
            interval = 1.0 / level.rate
            tasks: set[asyncio.Task] = set()
            for index in itertools.count():
                scheduled = t0 + index * interval
                if done.is_set() or scheduled >= window_end:
                    break
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    try:
                        await asyncio.wait_for(done.wait(), delay)
                        break
                    except asyncio.TimeoutError:
                        pass
                if len(tasks) >= settings.max_inflight:
                    dropped += 1
                    continue
                sent += 1
                task = asyncio.create_task(one(index, scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
    finally:
        progress.close()
    end = min(window_end, time.perf_counter())
    return _summarise(level, records, (window_start, end), sent, dropped, load_before)


async def run_load_async(
    base_url: str, payload: PayloadKind, levels: list[Level], settings: LoadSettings
) -> list[LevelResult]:
    import aiohttp

    largest = max((lv.concurrency or settings.max_inflight) for lv in levels)
    connector = aiohttp.TCPConnector(limit=largest)
    timeout = aiohttp.ClientTimeout(total=settings.timeout_s, connect=min(30.0, settings.timeout_s))
    results = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as client:
        for level in levels:
            results.append(await run_level(client, base_url.rstrip("/"), payload, level, settings))
    return results


def run_load(base_url: str, payload: PayloadKind, levels: list[Level], settings: LoadSettings) -> list[LevelResult]:
    """Synchronous entry point: one level after another, one HTTP client for all."""
    return asyncio.run(run_load_async(base_url, payload, levels, settings))


def load_report(base_url: str, payload: PayloadKind, settings: LoadSettings, results: list[LevelResult]) -> dict[str, Any]:
    """The JSON document `clip-bench load` writes."""
    return {
        "tool": "clip-bench load",
        "url": base_url,
        "payload": payload.describe(),
        "settings": {k: v for k, v in asdict(settings).items() if k != "headers"},
        "machine": machine_info(),
        "levels": [r.to_dict() for r in results],
    }


def wait_until_serving(base_url: str, payload: PayloadKind, timeout_s: float, process: Any = None,
                       headers: dict[str, str] | None = None) -> float:
    """Polls with one real request until it succeeds; returns the seconds waited. Raises on timeout/exit."""
    import httpx

    request = payload.request(0)
    started = time.perf_counter()
    last = "no answer"
    with httpx.Client(timeout=60.0, trust_env=False) as client:
        while time.perf_counter() - started < timeout_s:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"server process exited with {process.returncode} before serving ({last})")
            try:
                response = client.post(
                    base_url.rstrip("/") + request.path, content=request.body,
                    headers={"content-type": "application/json", **(headers or {})},
                )
                if response.status_code == 200:
                    return time.perf_counter() - started
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.5)
    raise TimeoutError(f"{base_url} did not serve within {timeout_s:.0f}s (last: {last})")
