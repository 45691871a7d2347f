"""`clip-bench soak`: the service under steady moderate load for minutes; every replica's memory over time.

    clip-bench soak --model ViT-B-32 --pretrained random --minutes 10 --concurrency 2

Our service (`serve run`, the three pools) gets closed-loop image and text clients side by side (the load
generator of `clip-bench load`) while this process samples the RSS of every Serve replica process every
`--sample-s` seconds. The report gives, per replica (by pid: a restarted replica shows as a new one), its RSS
after the warm-up, its minimum and maximum over the window and the spread (max / min - 1), and every non-2xx
outcome of the load.
"""

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve_app.bench.compare import CompareSettings, our_app_args
from serve_app.bench.servers import OurServer

@dataclass
class SoakSettings:
    model: str = "ViT-B-32"
    pretrained: str | None = "random"
    threads: int = 2
    minutes: float = 10.0
    warmup_s: float = 60.0  # load before memory counts: caches, allocator pools and oneDNN kernels fill first
    concurrency: int = 2  # clients per modality
    sample_s: float = 15.0
    app_args: dict[str, Any] = field(default_factory=dict)
    workdir: str = "/tmp/clip-bench-soak"


def run_soak(settings: SoakSettings) -> dict[str, Any]:
    from serve_app.bench.loadgen import Level, LoadSettings, run_load
    from serve_app.bench.payloads import ImagePayload, TextPayload
    from serve_app.bench.report import machine_info, replica_rss

    args = our_app_args(CompareSettings(model=settings.model, pretrained=settings.pretrained,
                                        threads=settings.threads, app_args=settings.app_args))
    server = OurServer(Path(settings.workdir), args)
    payloads = {"image": ImagePayload(model=args["served_model_name"]).prepare(),
                "text": TextPayload(model=args["served_model_name"]).prepare()}
    duration = settings.minutes * 60
    results: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    with server:
        server.wait_ready(payloads["image"], 600)

        def load(kind: str) -> None:
            load_settings = LoadSettings(duration_s=duration, warmup_s=settings.warmup_s, progress=False)
            (results[kind],) = run_load(server.base_url, payloads[kind], [Level(concurrency=settings.concurrency)],
                                        load_settings)

        clients = [threading.Thread(target=load, args=(kind,)) for kind in payloads]
        start = time.time()
        for client in clients:
            client.start()
        while any(client.is_alive() for client in clients):
            samples.append({"t": round(time.time() - start, 1), "replicas": replica_rss(server.process.pid)})
            time.sleep(settings.sample_s)
        for client in clients:
            client.join()
    report = {"tool": "clip-bench soak", "settings": asdict(settings), "app_args": args, "machine": machine_info(),
              "load": {kind: result.to_dict() for kind, result in results.items()}, "samples": samples}
    report["memory"] = memory_summary(samples, settings.warmup_s)
    return report


def memory_summary(samples: list[dict[str, Any]], warmup_s: float) -> list[dict[str, Any]]:
    """Per replica process: RSS at the first sample after the warm-up, min, max and spread over the window."""
    window = [s for s in samples if s["t"] >= warmup_s]
    rows = []
    for pid in sorted({pid for s in window for pid in s["replicas"]}):
        values = [s["replicas"][pid]["rss_mib"] for s in window if pid in s["replicas"]]
        name = next(s["replicas"][pid]["replica"] for s in window if pid in s["replicas"])
        low, high = min(values), max(values)
        rows.append({"replica": name, "pid": int(pid), "samples": len(values), "first_mib": values[0],
                     "min_mib": low, "max_mib": high, "spread": round(high / low - 1, 4) if low else None})
    return rows


def soak_table(report: dict[str, Any]) -> str:
    from serve_app.bench.report import fmt, format_table

    memory = format_table(
        ["replica", "pid", "samples", "RSS after warm-up MiB", "min MiB", "max MiB", "spread"],
        [[r["replica"], r["pid"], r["samples"], r["first_mib"], r["min_mib"], r["max_mib"],
          f"{100 * r['spread']:.1f} %" if r["spread"] is not None else ""] for r in report["memory"]],
    )
    load = format_table(
        ["modality", "clients", "seconds", "items/s", "p50 ms", "p99 ms", "ok", "other outcomes"],
        [[kind, r["concurrency"], fmt(r["window_s"], 0), fmt(r["items_per_s"]), fmt(r["latency_ms"].get("p50")),
          fmt(r["latency_ms"].get("p99")), r["ok"], ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items()))
          or "none"] for kind, r in report["load"].items()],
    )
    return f"{load}\n\n{memory}"
