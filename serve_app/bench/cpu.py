"""`clip-bench cpu`: what the serving path costs in CPU per request, in both layouts side by side.

    clip-bench cpu --layouts pools,one-process --payloads text:1,text:16,image:1,image:8 --concurrency 32

On a GPU node the encoder is fast and the CPUs are few, so a request's CPU outside the model (HAProxy, the
ingress, every Ray call between pools, Ray's own raylet and GCS) sets how many requests a node's cores can
carry. For each layout this starts our service (`serve run`, a local Ray of its own) with the given model (by
default a tiny random one, whose forward pass costs almost nothing, so what is measured is the serving path),
drives each payload closed-loop at a fixed concurrency, and reads the CPU time of every process of the
service (the `serve run` process tree: Ray's GCS, raylet and workers, HAProxy, the replicas) before and after
the window; the load generator runs in this process, outside that tree. It reports CPU ms per request and per
item, requests/s, the pools/one-process ratio per payload, and the cores those CPU costs imply at a stated
encoder rate; then, one client at a time (`latency_s`), the p50 latency and CPU per request of a lone client,
which any batching of concurrent requests must not make worse. The tokenizer's own cost per text is measured
in-process beside it.
"""

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(root_pid: int) -> float:
    """User + system CPU seconds of every live process under `root_pid` (itself included). A process that exits
    during a window takes its CPU with it; the service's processes live through a run (replicas do not restart
    under this load)."""
    from serve_app.bench.report import process_tree

    total = 0
    for pid in process_tree(root_pid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


@dataclass
class CpuSettings:
    model: str | None = None  # None: a tiny random open_clip model written to the workdir
    pretrained: str | None = None
    threads: int = 1
    layouts: list[str] = field(default_factory=lambda: ["pools", "one-process"])
    payloads: list[tuple[str, int]] = field(default_factory=lambda: [("text", 1), ("text", 16), ("image", 1),
                                                                      ("image", 8)])
    concurrency: int = 32
    duration_s: float = 15.0
    warmup_s: float = 3.0
    encoder_rate: float = 10_000.0  # items/s one GPU encodes, for the cores-per-GPU column
    latency_s: float = 5.0  # window of the concurrency-1 run per payload (0: none)
    app_args: dict[str, Any] = field(default_factory=dict)
    workdir: str = "/tmp/clip-bench-cpu"


def _payload(kind: str, items: int, model: str) -> Any:
    from serve_app.bench.payloads import ImagePayload, TextPayload

    if kind == "text":
        return TextPayload(model=model, items_per_request=items, distinct=128).prepare()
    return ImagePayload(model=model, items_per_request=items, distinct=max(8, 64 // items)).prepare()


def tokenizer_us_per_text(model: str, count: int = 4096) -> float:
    """The bounded tokenizer's time per short caption, in-process (no Ray)."""
    from serve_app.bench.payloads import short_texts
    from serve_app.modeling import get_tokenizer

    tokenizer = get_tokenizer(model)
    texts = short_texts(count, seed=7)
    tokenizer(texts[:64])
    start = time.perf_counter()
    for i in range(0, count, 64):
        tokenizer(texts[i : i + 64])
    return 1e6 * (time.perf_counter() - start) / count


def _lone_client(server: Any, payload: Any, seconds: float) -> dict[str, Any]:
    """One client, each request sent when the last returns: p50/p99 latency and CPU per request."""
    from serve_app.bench.loadgen import Level, LoadSettings, run_load

    cpu_before, start = tree_cpu_s(server.process.pid), time.perf_counter()
    (result,) = run_load(server.base_url, payload, [Level(concurrency=1)],
                         LoadSettings(duration_s=seconds, warmup_s=0.5, progress=False))
    cpu_s = tree_cpu_s(server.process.pid) - cpu_before
    # the warm-up's requests are in the CPU window too: divide by every request sent
    sent = max(result.sent, 1)
    return {"c1_p50_ms": _round(result.latency_ms.get("p50")), "c1_p99_ms": _round(result.latency_ms.get("p99")),
            "c1_cpu_ms_per_request": round(1000 * cpu_s / sent, 3), "c1_errors": result.errors,
            "c1_wall_s": round(time.perf_counter() - start, 2)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def serving_path_model(workdir: Path, model: str | None, pretrained: str | None) -> tuple[str, str | None]:
    """The model to measure: the one given, or a tiny random one written to `workdir` (its forward pass costs
    almost nothing, so what is measured is the serving path)."""
    from serve_app.dev_model import write_tiny_model

    if model is not None:
        return model, pretrained
    directory = workdir / "tiny-clip"
    if not (directory / "open_clip_config.json").exists():
        write_tiny_model(directory, seed=0)
    return f"local-dir:{directory}", None


def closed_loop_args(args: dict[str, Any], concurrency: int) -> dict[str, Any]:
    """A closed loop at full concurrency must meet neither the deadline nor the admission bound: a 429 would
    count as a cheap request and understate the CPU per request."""
    from serve_app.bench.compare import merge_args

    return merge_args(args, {"request_timeout_s": 120,
                             "limits": {"max_requests_in_flight": max(1024, 4 * concurrency)}})


def run_cpu(settings: CpuSettings) -> dict[str, Any]:
    from serve_app.bench.compare import CompareSettings, one_process_app_args, our_app_args
    from serve_app.bench.loadgen import Level, LoadSettings, run_load
    from serve_app.bench.report import machine_info
    from serve_app.bench.servers import OurServer

    workdir = Path(settings.workdir)
    model, pretrained = serving_path_model(workdir, settings.model, settings.pretrained)
    compare = CompareSettings(model=model, pretrained=pretrained, threads=settings.threads,
                              app_args=settings.app_args)
    rows = []
    for layout in settings.layouts:
        args = one_process_app_args(compare) if layout == "one-process" else our_app_args(compare)
        args = closed_loop_args(args, settings.concurrency)
        server = OurServer(workdir / layout, args)
        served = args["served_model_name"]
        with server:
            server.wait_ready(_payload("text", 1, served), 600)
            for kind, items in settings.payloads:
                payload = _payload(kind, items, served)
                level = [Level(concurrency=settings.concurrency)]
                run_load(server.base_url, payload, level,
                         LoadSettings(duration_s=settings.warmup_s, warmup_s=0.0, progress=False))
                cpu_before, start = tree_cpu_s(server.process.pid), time.perf_counter()
                (result,) = run_load(server.base_url, payload, level,
                                     LoadSettings(duration_s=settings.duration_s, warmup_s=0.0, progress=False))
                cpu_s, wall_s = tree_cpu_s(server.process.pid) - cpu_before, time.perf_counter() - start
                done = max(result.completed, 1)
                alone = _lone_client(server, payload, settings.latency_s) if settings.latency_s > 0 else {}
                rows.append({
                    "layout": layout, "payload": f"{kind} x{items}", "requests_per_s": round(done / wall_s, 1),
                    "items_per_s": round(done * items / wall_s, 1), "ok": result.ok, "completed": result.completed,
                    "cpu_s": round(cpu_s, 2), "wall_s": round(wall_s, 2),
                    "cpu_ms_per_request": round(1000 * cpu_s / done, 3),
                    "cpu_ms_per_item": round(1000 * cpu_s / (done * items), 3),
                    "cores_at_encoder_rate": round(settings.encoder_rate * cpu_s / (done * items), 2),
                    "errors": result.errors, **alone,
                })
    ratios = {}
    for row in rows:
        if row["layout"] == "pools":
            other = next((r for r in rows if r["layout"] == "one-process" and r["payload"] == row["payload"]), None)
            if other and other["cpu_ms_per_request"]:
                ratios[row["payload"]] = round(row["cpu_ms_per_request"] / other["cpu_ms_per_request"], 2)
    return {"tool": "clip-bench cpu", "settings": asdict(settings), "model": model, "machine": machine_info(),
            "tokenizer_us_per_text": round(tokenizer_us_per_text(model), 1), "rows": rows,
            "pools_over_one_process": ratios}


def cpu_table(report: dict[str, Any]) -> str:
    from serve_app.bench.report import format_table

    rate = report["settings"]["encoder_rate"]
    table = format_table(
        ["layout", "payload", "requests/s", "items/s", "CPU ms/request", "CPU ms/item",
         f"cores at {rate:,.0f} items/s", "errors", "c=1 p50 ms", "c=1 CPU ms/request"],
        [[r["layout"], r["payload"], r["requests_per_s"], r["items_per_s"], r["cpu_ms_per_request"],
          r["cpu_ms_per_item"], r["cores_at_encoder_rate"],
          ", ".join(f"{k}: {v}" for k, v in {**r["errors"], **r.get("c1_errors", {})}.items()) or "none",
          r.get("c1_p50_ms"), r.get("c1_cpu_ms_per_request")] for r in report["rows"]],
    )
    ratios = ", ".join(f"{k}: {v}x" for k, v in report["pools_over_one_process"].items())
    return (f"{table}\n\nCPU per request, pools / one process: {ratios}\n"
            f"tokenizer: {report['tokenizer_us_per_text']} us per short caption (in-process)")
