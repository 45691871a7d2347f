"""EXPERIMENT: `serve run` on a fresh local Ray started without the head node's dashboard (not adopted).

    python -m serve_app.bench.experiments.no_dashboard deploy/dev.yaml    # serve run's arguments
    python -m serve_app.bench.experiments.idle_wakeups --variants slow-loops,no-dashboard --passes --rounds 3
    python -m serve_app.bench.experiments.refill_ab --dashboard-ab         # served, alternated on fresh servers

A local `serve run` also starts Ray's dashboard: a web UI and its nine module processes, which wake ~225 times
a second between them and hold ~240 MiB (PSS). Here Ray is started with `include_dashboard=False` and then
Ray's own `serve run` command runs on it (it initialises Ray only if nobody has). Each node's agent, which
exports the metrics, still runs. Fewer wake-ups made batch-1 passes beside the idle service faster, but the
served service was no faster (BENCHMARKS.md, "Ray without its dashboard, not adopted"), so `make serve`
keeps the dashboard.
"""

import sys


def main(argv: list[str]) -> int:
    if any(arg == "--address" or arg.startswith(("--address=", "-a")) for arg in argv):
        print("no_dashboard always starts its own local Ray; use `serve run --address ...` for a cluster",
              file=sys.stderr)
        return 2
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.scripts import run

    ray.init(address="local", namespace=SERVE_NAMESPACE, include_dashboard=False)
    return run.main(args=argv, prog_name="serve run", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
