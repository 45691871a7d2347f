"""`clip-bench step`: a step load against the service with autoscaling, and the replicas of each pool over time.

    clip-bench step --model ViT-B-32 --pretrained random --payload text --steps 1:30,16:120,1:120

The service runs in a Ray instance of its own (`serve run`'s environment: deploy/ray-serve.env plus the small-CPU
tuning), started by this module's `serve` entry point, which also writes every pool's running and target
replica counts, read from Serve's own status, once a second. The load is closed-loop at each step's
concurrency (the load generator of `clip-bench load`). The report gives, per step, throughput, p50/p99 and
every non-2xx outcome; over the run, the seconds from the load step to the first added encoder replica
running, and from the end of the step to the pool back at its minimum.
"""

import json
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve_app.bench.compare import merge_args
from serve_app.bench.servers import OurServer

APP = "clip"


@dataclass
class StepSettings:
    model: str = "ViT-B-32"
    pretrained: str | None = "random"
    threads: int = 1
    payload: str = "text"  # text | image
    items_per_request: int = 1
    steps: list[tuple[int, float]] = field(default_factory=lambda: [(1, 30.0), (16, 120.0), (1, 120.0)])
    max_replicas: int = 2
    app_args: dict[str, Any] = field(default_factory=dict)  # merged over `step_app_args`
    workdir: str = "/tmp/clip-bench-step"
    startup_timeout_s: float = 300.0


def step_app_args(settings: StepSettings) -> dict[str, Any]:
    """The service with every pool autoscaling, the encoder on queue depth, scaled for a small CPU box: replicas
    report every second and act after 2 s of backlog; they are given back after 20 s without."""
    fast = {"metrics_interval_s": 1.0, "look_back_period_s": 2.0, "upscale_delay_s": 2.0, "downscale_delay_s": 20.0}
    args: dict[str, Any] = {
        "model": settings.model, "pretrained": settings.pretrained, "device": "cpu",
        "torch_threads": settings.threads,
        "encoder": {"num_cpus": 0.5, "autoscaling_config": {"min_replicas": 1, "max_replicas": settings.max_replicas,
                                                             **fast}},
        "preprocessor": {"num_cpus": 0.25, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, **fast}},
        "ingress": {"num_cpus": 0.25},
    }
    return merge_args(args, settings.app_args)


class ScalingServer(OurServer):
    """Our service in its own Ray, with a status file of every pool's replicas, once a second."""

    name = "ours-step"

    def __init__(self, workdir: Path, app_args: dict[str, Any]) -> None:
        super().__init__(workdir, app_args)
        self.status_path = self.workdir / "replicas.jsonl"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "serve_app.bench.step", str(self.config_path), str(self.status_path)]

    def timeline(self) -> list[dict[str, Any]]:
        try:
            lines = self.status_path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]


def _payload(settings: StepSettings) -> Any:
    from serve_app.bench.payloads import ImagePayload, TextPayload

    kind = ImagePayload if settings.payload == "image" else TextPayload
    return kind(items_per_request=settings.items_per_request).prepare()


def run_step(settings: StepSettings) -> dict[str, Any]:
    from serve_app.bench.loadgen import Level, LoadSettings, run_load
    from serve_app.bench.report import machine_info

    payload = _payload(settings)
    server = ScalingServer(Path(settings.workdir), step_app_args(settings))
    steps: list[dict[str, Any]] = []
    with server:
        server.wait_ready(payload, settings.startup_timeout_s)
        for concurrency, seconds in settings.steps:
            started = time.time()
            load = LoadSettings(duration_s=seconds, warmup_s=0.0, progress=False, timeout_s=120.0)
            (result,) = run_load(server.base_url, payload, [Level(concurrency=concurrency)], load)
            steps.append({"concurrency": concurrency, "start": started, "end": time.time(), **result.to_dict()})
        timeline = server.timeline()
    report = {
        "tool": "clip-bench step",
        "settings": asdict(settings),
        "app_args": server.app_args,
        "machine": machine_info(),
        "steps": steps,
        "timeline": timeline,
    }
    report["scaling"] = scaling_summary(report)
    return report


def _encoder(timeline: list[dict[str, Any]]) -> str | None:
    names = {name for sample in timeline for name in sample["running"]}
    return next((name for name in sorted(names) if name.startswith("ClipEncoder")), None)


def scaling_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Seconds from the busiest step's start to a second encoder replica running, and from its end to the
    encoder pool back at its first count; failed requests (not 2xx, not 429/503 refusals) and refusals."""
    timeline, steps = report["timeline"], report["steps"]
    encoder = _encoder(timeline)
    summary: dict[str, Any] = {"encoder": encoder, "scale_up_s": None, "scale_down_s": None, "max_replicas": None}
    failed = sum(n for s in steps for status, n in s["errors"].items() if status not in ("429", "503"))
    refused = sum(n for s in steps for status, n in s["errors"].items() if status in ("429", "503"))
    summary.update(failed_requests=failed, refused_requests=refused)
    if encoder is None or not steps:
        return summary
    busiest = max(steps, key=lambda s: s["concurrency"])
    counts = [(sample["t"], sample["running"].get(encoder, 0)) for sample in timeline]
    before = [n for t, n in counts if t <= busiest["start"]]
    base = before[-1] if before else (counts[0][1] if counts else 0)
    summary["max_replicas"] = max((n for _, n in counts), default=None)
    up = next((t for t, n in counts if t >= busiest["start"] and n > base), None)
    if up is not None:
        summary["scale_up_s"] = round(up - busiest["start"], 1)
        down = next((t for t, n in counts if t >= max(up, busiest["end"]) and n <= base), None)
        if down is not None:
            summary["scale_down_s"] = round(down - busiest["end"], 1)
    return summary


def step_table(report: dict[str, Any]) -> str:
    from serve_app.bench.report import fmt, format_table

    rows = []
    for step in report["steps"]:
        latency = step["latency_ms"]
        rows.append([step["concurrency"], fmt(step["window_s"], 0), fmt(step["requests_per_s"]),
                     fmt(latency.get("p50")), fmt(latency.get("p99")), step["ok"],
                     ", ".join(f"{k}: {v}" for k, v in sorted(step["errors"].items())) or "none"])
    table = format_table(["clients", "seconds", "req/s", "p50 ms", "p99 ms", "ok", "other outcomes"], rows)
    s = report["scaling"]
    return (f"{table}\n\nencoder pool {s['encoder']}: up to {s['max_replicas']} replicas; "
            f"a second replica running {s['scale_up_s']} s after the load step, back to the minimum "
            f"{s['scale_down_s']} s after it ended; failed requests {s['failed_requests']}, "
            f"refused (429/503) {s['refused_requests']}")


def plot_step(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from serve_app.bench.plot import save_figure

    timeline = report["timeline"]
    t0 = report["steps"][0]["start"] if report["steps"] else (timeline[0]["t"] if timeline else 0.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for name in sorted({n for sample in timeline for n in sample["running"]}):
        top.step([s["t"] - t0 for s in timeline], [s["running"].get(name, 0) for s in timeline], where="post",
                 label=name)
    top.set_ylabel("running replicas")
    top.legend(loc="upper right", fontsize=8)
    for step in report["steps"]:
        start, end = step["start"] - t0, step["end"] - t0
        bottom.hlines(step["requests_per_s"], start, end, colors="tab:blue")
        bottom.text(start, step["requests_per_s"], f" c={step['concurrency']}", fontsize=8, va="bottom")
        top.axvspan(start, end, alpha=0.06 * min(step["concurrency"], 10), color="tab:orange")
    bottom.set_ylabel("requests/s")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds")
    fig.suptitle("clip-bench step: replicas per pool under a step load")
    return save_figure(fig, path)


# ------------------------------------------------------------------ the server process


def serve(config_path: str, status_path: str) -> None:
    """Starts Ray and the app of a Serve config, then writes the replicas of every pool once a second until
    SIGINT/SIGTERM."""
    from serve_app.ray_env import use_one_machine_env

    use_one_machine_env()
    import ray
    from ray import serve as ray_serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(namespace="serve", include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.start(http_options=config["http_options"])
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": config["applications"]}))
        with open(status_path, "a", encoding="utf-8") as out:
            while not stop.wait(1.0):
                application = ray_serve.status().applications.get(APP)
                if application is None:
                    continue
                running = {name: d.replica_states.get("RUNNING", 0) for name, d in application.deployments.items()}
                out.write(json.dumps({"t": time.time(), "running": running}) + "\n")
                out.flush()
    finally:
        ray_serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
