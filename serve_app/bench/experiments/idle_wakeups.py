"""EXPERIMENT: how often the idle service's processes wake up, per Ray environment variant (BENCHMARKS.md).

    python -m serve_app.bench.experiments.idle_wakeups                      # one-process layout, 2 rounds
    python -m serve_app.bench.experiments.idle_wakeups --layout pools --rounds 1 --per-process
    python -m serve_app.bench.experiments.idle_wakeups --passes    # and batch-1 passes beside each service

Starts the service (ViT-B-32, random weights, production Ray env) once per variant and round, waits until it
serves and then 5 s more, and counts CPU and context switches (wake-ups and preemptions) of every process of
its session over 10 s. On two cores each wake-up can preempt one of torch's two threads.
"""

import argparse
import sys
import time
from pathlib import Path

from serve_app.bench.cpu_by_process import usage
from serve_app.bench.payloads import TextPayload
from serve_app.bench.servers import OurServer

# Ray's environment per variant, on top of the production one (deploy/ray-serve.env). Ray Serve's controller
# loop and metric export intervals are 0.1 s each by default (both read at process start).
DEFAULT_LOOPS = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "100"}
VARIANTS: dict[str, dict[str, str]] = {
    "default": DEFAULT_LOOPS,
    "slow-loops": {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"},
    # and Ray core's own 100 ms / 250 ms periodic work in the raylet (resource reports to the GCS, the GC
    # check, the memory monitor's refresh), read by every Ray process at start.
    "quiet": {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
              "RAY_raylet_report_resources_period_milliseconds": "1000",
              "RAY_raylet_check_gc_period_milliseconds": "1000", "RAY_memory_monitor_refresh_ms": "1000"},
}
# Variants whose local Ray starts without the head's dashboard (experiments/no_dashboard.py); the others
# through plain `serve run`, which starts it.
WITHOUT_DASHBOARD = {"no-dashboard": VARIANTS["slow-loops"]}
VARIANTS |= WITHOUT_DASHBOARD


def measure(layout: str, env: dict[str, str], workdir: Path, window_s: float = 10.0,
            passes: bool = False, dashboard: bool = True) -> list[tuple[str, float, float]]:
    """(command, cores, switches/s) of each process of the idle service's session; with `passes`, also prints
    the p50 of batch-1 text and image passes in this process beside the idle service (see pass_timing)."""
    args = {"model": "ViT-B-32", "pretrained": "random", "served_model_name": "bench", "torch_threads": 2,
            "layout": layout}
    server = OurServer(workdir, args, env=env, dashboard=dashboard)
    server.start()
    try:
        server.wait_ready(TextPayload(model="bench", distinct=8).prepare(), 180)
        time.sleep(5)
        rows, _ = usage(window_s, set(server.session_pids()))
        if passes:
            from serve_app.bench.experiments.pass_timing import _core, _p50_ms

            core = _core()
            print(f"    beside it: text pass p50 {_p50_ms(core, kind='text')} ms, image pass p50 {_p50_ms(core)} ms",
                  flush=True)
    finally:
        server.stop()
    return [(cmd, cores, switches) for cores, switches, cmd in rows]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="one-process", choices=("pools", "one-process"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-process", action="store_true", help="every process, not only the busiest six")
    parser.add_argument("--passes", action="store_true", help="batch-1 passes beside each idle service")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--workdir", default="/tmp/idle-wakeups")
    args = parser.parse_args(argv)
    for round_ in range(args.rounds):
        for name in args.variants.split(","):
            rows = measure(args.layout, VARIANTS[name], Path(args.workdir) / f"{name}-{round_}", passes=args.passes,
                           dashboard=name not in WITHOUT_DASHBOARD)
            cores, switches = sum(r[1] for r in rows), sum(r[2] for r in rows)
            print(f"round {round_} {name}: {len(rows)} processes, {cores:.3f} cores, {switches:.0f} switches/s",
                  flush=True)
            for cmd, c, s in sorted(rows, key=lambda r: -r[2])[: None if args.per_process else 6]:
                print(f"    {s:6.0f}/s {c:.3f} cores  {cmd[:100]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
