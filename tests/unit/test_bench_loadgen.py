"""serve_app.bench.loadgen without a server: client errors are counted, and the steady-state throughput does
not jump with a batching server's bursts."""

import pytest

from serve_app.bench import payloads as P
from serve_app.bench.loadgen import Level, LoadSettings, run_load
from serve_app.ray_env import free_port


def quick(**kw) -> LoadSettings:
    return LoadSettings(**{"duration_s": 30.0, "warmup_s": 0.0, "timeout_s": 30.0, "progress": False, **kw})


def test_unreachable_server_counts_client_errors():
    url = f"http://127.0.0.1:{free_port()}"
    result = run_load(url, P.TextPayload(model="x", distinct=1), [Level(concurrency=1)], quick(max_requests=3))[0]
    assert result.ok == 0 and result.error_count == 3 and list(result.errors) == ["ConnectError"]
    assert result.latency_ms["p50"] is None


def test_closed_loop_throughput_does_not_jump_with_bursts():
    """A batching server answers all 32 clients at once every 2.2 s: 14.55 requests/s whatever the window's
    phase, while counting completions in a 15 s window gives 6 or 7 bursts (12.8 or 14.9 per s)."""
    from serve_app.bench.loadgen import Level, _Record, _summarise

    period, clients = 2.2, 32
    records = [_Record(k * period, (k + 1) * period, "200", 1) for k in range(20) for _ in range(clients)]
    rates, counted = [], []
    for phase in (3.0, 3.5, 4.5, 5.0):
        result = _summarise(Level(concurrency=clients), records, (phase, phase + 15.0), len(records), 0, None)
        rates.append(result.items_per_s)
        counted.append(result.items_per_s_completed)
        assert result.requests_per_s == pytest.approx(clients / period)
    assert rates == pytest.approx([clients / period] * 4)
    assert {round(c, 2) for c in counted} == {round(6 * clients / 15, 2), round(7 * clients / 15, 2)}
