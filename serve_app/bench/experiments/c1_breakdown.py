"""EXPERIMENT: where a short text's time goes at concurrency 1 (BENCHMARKS.md, "OpenMP workers that sleep sooner").

    python -m serve_app.bench.experiments.c1_breakdown              # 2 rounds
    python -m serve_app.bench.experiments.c1_breakdown 3 --env GOMP_SPINCOUNT=10000   # the replica's env

ViT-B-32 (random weights, 2 torch threads) in one process, as `compare` serves it. Per round: batch-1 text
passes timed in this process before the service starts, beside it while it idles, and after it stopped; then
one client sends short texts for 15 s, and the service's own histograms (request, preprocessing, queue wait,
forward pass, refill wait; sum/count deltas from Ray's metrics endpoint) and the replica's threads (CPU time
and context switches from /proc) over that window say where each request's time went.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from serve_app.bench.cpu_by_process import thread_times
from serve_app.bench.experiments.pass_timing import _core, _p50_ms
from serve_app.bench.experiments.refill_ab import _cmdline, _metrics_url, histogram_totals
from serve_app.bench.loadgen import Level, LoadSettings, run_load
from serve_app.bench.payloads import TextPayload
from serve_app.bench.servers import OurServer

HISTOGRAMS = ("request_seconds", "preprocess_seconds", "queue_wait_seconds", "encode_seconds", "refill_wait_seconds")


def one_round(core, round_: int, env: dict[str, str], workdir: Path) -> None:
    texts = TextPayload(model="bench", distinct=128).prepare()
    alone_before = _p50_ms(core, kind="text")
    model = {"model": "ViT-B-32", "pretrained": "random", "served_model_name": "bench", "torch_threads": 2}
    if env:
        model["encoder"] = {"env_vars": env}
    server = OurServer(workdir / f"round-{round_}", {"layout": "one-process", "models": [model]})
    server.start()
    try:
        server.wait_ready(texts, 180)
        replica = next(pid for pid in server.session_pids() if b"ServeReplica" in _cmdline(pid))
        url = _metrics_url(server)
        time.sleep(12)  # the replica pushes its metrics every few seconds: let the warm-up's settle
        beside_idle = _p50_ms(core, kind="text")
        before, threads_before = histogram_totals(url, HISTOGRAMS), thread_times(replica)
        (result,) = run_load(server.base_url, texts, [Level(concurrency=1)],
                             LoadSettings(duration_s=15, warmup_s=0.01, progress=False))
        threads_after = thread_times(replica)
        time.sleep(12)
        after = histogram_totals(url, HISTOGRAMS)
    finally:
        server.stop()
    alone_after = _p50_ms(core, kind="text")
    requests = after[("request_seconds", None, "count")] - before.get(("request_seconds", None, "count"), 0.0)
    print(f"round {round_}: one client {result.items_per_s:.2f} texts/s (p50 {result.latency_ms['p50']:.1f} ms); "
          f"bare text pass p50 alone {alone_before} ms, beside the idle service {beside_idle} ms, "
          f"alone after {alone_after} ms", flush=True)
    parts = []
    for name in HISTOGRAMS:
        count = after.get((name, None, "count"), 0.0) - before.get((name, None, "count"), 0.0)
        total = after.get((name, None, "sum"), 0.0) - before.get((name, None, "sum"), 0.0)
        parts.append(f"{name.removesuffix('_seconds')} {1000 * total / count:.2f} ms" if count else f"{name} -")
    print(f"    service, mean per request ({requests:.0f}): " + "; ".join(parts), flush=True)
    rows = []
    for tid, (name, cpu, voluntary, involuntary) in threads_after.items():
        if tid in threads_before:
            _, cpu0, voluntary0, involuntary0 = threads_before[tid]
            rows.append((cpu - cpu0, voluntary - voluntary0, involuntary - involuntary0, tid, name))
    for cpu, voluntary, involuntary, tid, name in sorted(rows, reverse=True)[:4]:
        print(f"    replica thread {tid} ({name}): {1000 * cpu / requests:6.2f} ms CPU, {voluntary / requests:5.1f} "
              f"voluntary and {involuntary / requests:5.1f} involuntary switches per request", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", nargs="?", type=int, default=2)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the replica's environment")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    core = _core()
    workdir = Path(tempfile.mkdtemp(prefix="c1-breakdown-"))
    for round_ in range(args.rounds):
        one_round(core, round_, env, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
