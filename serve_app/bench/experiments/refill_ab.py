"""EXPERIMENT: the encoder gate's refill wait on and off (or any batching settings), alternated on fresh servers.

    python -m serve_app.bench.experiments.refill_ab                     # 3 rounds, one-process layout
    python -m serve_app.bench.experiments.refill_ab --rounds 2 --layout pools
    python -m serve_app.bench.experiments.refill_ab --variant 'wait 2 ms={}' \
        --variant 'wait 0={"batch_wait_timeout_s": 0, "text_batch_wait_timeout_s": 0}'   # any batching A/B
    python -m serve_app.bench.experiments.refill_ab --same-server --rounds 6 --loads 'texts c=1,images c=1' \
        --variant ...                        # variants alternated on one server, switched through user_config
    python -m serve_app.bench.experiments.refill_ab --spec-variant 'default={}' \
        --spec-variant 'spin={"encoder": {"env_vars": {"GOMP_SPINCOUNT": "10000000"}}}'   # model settings
    python -m serve_app.bench.experiments.refill_ab --ray-env-variant 'default={}' \
        --ray-env-variant 'slow={"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}'   # Ray's own environment
    python -m serve_app.bench.experiments.refill_ab --code-variant 'before=/tmp/wt-before' \
        --code-variant 'after=.'              # two checkouts (git worktree add /tmp/wt-before COMMIT)
    python -m serve_app.bench.experiments.refill_ab --dashboard-ab   # Ray's dashboard or not (no_dashboard.py)

ViT-B-32 (random weights, 2 torch threads) served as in production, once with `refill_wait_fraction: 0`
(the gate opens when a pass ends) and once with the default, alternating, each on a freshly started server.
Loads: short texts in a closed loop at concurrency 32 (the clients that wait for their answers, which the
refill is for), short texts in an open loop at a fixed rate (independent requests, which it must not slow
down), 640x480 JPEGs at concurrency 32, and both at concurrency 1 (latency). Besides throughput and latency it reads the encoder's own
batch-size histogram from Ray's metrics endpoint, to show the batches the clients formed.

Fresh servers with equal settings differ by more than some effects (open-loop p50 133-277 ms); `--same-server`
starts one server and switches the variants on it the way an operator would change `user_config` (the
replica's `reconfigure`, no restart), so that the variants differ in their batching only.
"""

import argparse
import http.client
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from serve_app.bench.loadgen import Level, LoadSettings, run_load
from serve_app.bench.payloads import ImagePayload, TextPayload
from serve_app.bench.servers import OurServer

VARIANTS = {"refill off": {"refill_wait_fraction": 0.0}, "refill 0.5": {"refill_wait_fraction": 0.5}}


@dataclass
class Variant:
    """What one variant changes: batching (switchable on a running server), or what a server starts with."""

    batching: dict = field(default_factory=dict)
    model_settings: dict = field(default_factory=dict)
    ray_env: dict = field(default_factory=dict)
    code_dir: str | None = None  # another checkout of this repository to serve
    dashboard: bool = True  # False: a local Ray without its dashboard (no_dashboard.py)


def _listening_ports(pids: list[int]) -> list[int]:
    """TCP ports these processes listen on (/proc/net/tcp* LISTEN entries whose socket they hold)."""
    port_of_inode = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                port_of_inode[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    ports = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in port_of_inode:
                ports.add(port_of_inode[target[8:-1]])
    return sorted(ports)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _metrics_url(server: OurServer) -> str | None:
    """Ray's metrics export endpoint of the server's node (the dashboard agent's Prometheus port)."""
    agents = [pid for pid in server.session_pids() if b"DashboardAgent" in _cmdline(pid)]
    for port in _listening_ports(agents):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                if b"ray_" in response.read(4096):
                    return f"http://127.0.0.1:{port}/metrics"
        except (OSError, http.client.HTTPException):  # the agent's gRPC ports do not speak HTTP/1
            continue
    return None


def histogram_totals(metrics_url: str, names: tuple[str, ...], by: str | None = None) -> dict[tuple, float]:
    """(histogram, label `by`'s value or None, "sum" | "count") -> value so far, summed over the other labels,
    for the service's `ray_clip_<name>` histograms on Ray's metrics endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    totals: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("ray_clip_")
        if name not in names:
            continue
        for sample in family.samples:
            kind = sample.name.rsplit("_", 1)[1]
            if kind in ("sum", "count"):
                key = (name, sample.labels.get(by, "?") if by else None, kind)
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _batch_sizes(metrics_url: str | None) -> dict[str, tuple[float, float]]:
    """modality -> (passes, rows) so far, from the encoder's `clip_batch_size` histogram."""
    if metrics_url is None:
        return {}
    totals = histogram_totals(metrics_url, ("batch_size",), by="modality")
    modalities = {modality for _, modality, _ in totals}
    return {m: (totals.get(("batch_size", m, "count"), 0.0), totals.get(("batch_size", m, "sum"), 0.0))
            for m in modalities}


def _gcs_address(server: OurServer) -> str:
    """host:port of the server's own Ray (from its raylet's `--gcs-address`)."""
    for pid in server.session_pids():
        for arg in _cmdline(pid).split(b"\0"):
            if arg.startswith(b"--gcs-address="):
                return arg.split(b"=", 1)[1].decode()
    raise RuntimeError("no Ray process with --gcs-address in the server's session")


def _reconfigure(server: OurServer, layout: str, batching: dict) -> None:
    """Sends `batching` to the running replica as its whole `user_config` (unset fields: the defaults), from a
    driver that disconnects at once so that it adds no process to what is measured."""
    # `serve run` starts its local Ray with token auth (Ray 2.60's default for a new local cluster, token in
    # ~/.ray/auth_token); a driver that attaches to it by address has to ask for it, before Ray is imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import serve

    from serve_app.config import BatchSettings

    deployment = "OpenAIIngress" if layout == "one-process" else "ClipEncoder-bench"
    ray.init(address=_gcs_address(server), namespace="serve", log_to_driver=False, logging_level="ERROR")
    try:
        handle = serve.get_deployment_handle(deployment, app_name="clip")
        handle.reconfigure.remote(BatchSettings.model_validate(batching).model_dump()).result(timeout_s=60)
        if layout == "one-process":
            (info,) = handle.in_process_info.remote().result(timeout_s=60).values()
        else:
            info = handle.info.remote().result(timeout_s=60)
        print(f"reconfigured: {info['batching']}", flush=True)
    finally:
        ray.shutdown()


def _measure(server: OurServer, variant: str, round_: int, loads: list, settings: LoadSettings) -> None:
    metrics_url = _metrics_url(server)
    for name, payload, level in loads:
        before = _batch_sizes(metrics_url)
        (result,) = run_load(server.base_url, payload, [level], settings)
        after = _batch_sizes(metrics_url)
        (passes_before, rows_before) = before.get(payload.modality, (0, 0))
        (passes_after, rows_after) = after.get(payload.modality, (0, 0))
        passes, rows = passes_after - passes_before, rows_after - rows_before
        mean = f"{rows / passes:5.1f}" if passes else "    ?"
        lat = result.latency_ms
        print(f"round {round_} {variant:10s} {name:12s} {result.items_per_s:7.2f} items/s  "
              f"p50 {lat['p50']:7.1f} ms  p99 {lat['p99']:7.1f} ms  mean batch {mean}  "
              f"errors {result.error_count}", flush=True)


def _named(specs: list[str], parse=json.loads) -> dict:
    """`NAME=VALUE` arguments -> {NAME: parse(VALUE)} (JSON by default), in the order given."""
    named = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        named[name] = parse(value)
    return named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layout", default="one-process", choices=["one-process", "pools"])
    parser.add_argument("--rate", type=float, default=50.0, help="open-loop texts per second")
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--workdir", default="/tmp/clip-bench-refill-ab")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=JSON batching settings, repeated (default: refill off against 0.5)")
    parser.add_argument("--spec-variant", action="append", default=[],
                        help="NAME=JSON model settings (e.g. the encoder pool's env_vars), repeated; fresh servers")
    parser.add_argument("--ray-env-variant", action="append", default=[],
                        help="NAME=JSON environment of the server's Ray processes, repeated; fresh servers")
    parser.add_argument("--code-variant", action="append", default=[],
                        help="NAME=DIR: a checkout of this repository to serve, repeated; fresh servers")
    parser.add_argument("--dashboard-ab", action="store_true",
                        help="plain `serve run` (with Ray's dashboard) against no_dashboard.py; fresh servers")
    parser.add_argument("--reverse", action="store_true", help="the variants in the opposite order in each round")
    parser.add_argument("--same-server", action="store_true",
                        help="one server for all variants, switched through the replica's reconfigure")
    parser.add_argument("--loads", default=None, help="comma-separated subset of the load names, in that order")
    args = parser.parse_args(argv)
    fresh_only = [flag for flag in ("spec_variant", "ray_env_variant", "code_variant", "dashboard_ab")
                  if getattr(args, flag)]
    if len(fresh_only) > 1 or (fresh_only and (args.variant or args.same_server)):
        parser.error("--spec-variant, --ray-env-variant, --code-variant and --dashboard-ab change what a server "
                     "starts with: one of them, and not with --variant or --same-server")
    variants = {name: Variant(batching=batching) for name, batching in VARIANTS.items()}
    if args.variant:
        variants = {name: Variant(batching=batching) for name, batching in _named(args.variant).items()}
    if args.spec_variant:
        variants = {name: Variant(model_settings=settings) for name, settings in _named(args.spec_variant).items()}
    if args.ray_env_variant:
        variants = {name: Variant(ray_env=env) for name, env in _named(args.ray_env_variant).items()}
    if args.code_variant:
        checkouts = _named(args.code_variant, parse=lambda path: str(Path(path).resolve()))
        variants = {name: Variant(code_dir=checkout) for name, checkout in checkouts.items()}
    if args.dashboard_ab:
        variants = {"dashboard": Variant(), "no-dash": Variant(dashboard=False)}
    if args.reverse:
        variants = dict(reversed(variants.items()))
    texts = TextPayload(model="bench", distinct=128).prepare()
    images = ImagePayload(model="bench", width=640, height=480, distinct=128).prepare()
    loads = [
        ("texts c=32", texts, Level(concurrency=32)),
        (f"texts {args.rate:g}/s", texts, Level(rate=args.rate)),
        ("texts c=1", texts, Level(concurrency=1)),
        ("images c=32", images, Level(concurrency=32)),
        ("images c=1", images, Level(concurrency=1)),
    ]
    if args.loads:
        by_name = {load[0]: load for load in loads}
        loads = [by_name[name.strip()] for name in args.loads.split(",")]
    settings = LoadSettings(duration_s=args.duration, warmup_s=3, progress=False)
    shared: OurServer | None = None
    try:
        for round_ in range(1, args.rounds + 1):
            for index, (variant, chosen) in enumerate(variants.items()):
                if args.same_server and shared is not None:
                    _reconfigure(shared, args.layout, chosen.batching)
                    time.sleep(2)
                    server = shared
                else:
                    model = {"model": "ViT-B-32", "pretrained": "random", "served_model_name": "bench",
                             "torch_threads": 2, "batching": chosen.batching, **chosen.model_settings}
                    app_args = {"layout": args.layout, "models": [model]}
                    server = OurServer(Path(args.workdir) / f"{round_}-{index}", app_args, env=chosen.ray_env,
                                       code_dir=chosen.code_dir, dashboard=chosen.dashboard)
                    if args.same_server:
                        shared = server
                    server.start()
                try:
                    server.wait_ready(loads[0][1], 180)
                    _measure(server, variant, round_, loads, settings)
                finally:
                    if server is not shared:
                        server.stop()
    finally:
        if shared is not None:
            shared.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
