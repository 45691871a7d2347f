"""`clip-bench tenancy`: the ingress with tenancy on (keys, limits in Redis, usage in PostgreSQL) against off,
side by side in one run.

    clip-bench tenancy --redis-url redis://127.0.0.1:6390/0 \
        --database-url postgresql+asyncpg://clip:clip@127.0.0.1:5490/clip --concurrency 32

Both services run at once (two `serve run`s of the pools layout, a tiny random model by default, so what is
measured is the serving path); their windows alternate, `--rounds` times each, so that the machine's drift
falls on both alike. Tenancy on: one key with limits and credit far above what the run can spend, so every
request takes the whole path (the key's lookup, the credit check, a request, token and image hit and their
settling in Redis, a usage record written to the database) and none is refused. Reported: requests/s and the
CPU ms per request of every process of each service (`clip-bench cpu`'s reading), and on/off ratios.
"""

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH_SECRET = "sk-bench-tenancy-0000"  # a key of the benchmark's own throwaway keys file, nothing else


@dataclass
class TenancyBenchSettings:
    redis_url: str
    database_url: str
    model: str | None = None
    pretrained: str | None = None
    threads: int = 1
    payloads: list[tuple[str, int]] = field(default_factory=lambda: [("text", 1)])
    concurrency: int = 32
    duration_s: float = 15.0
    warmup_s: float = 3.0
    rounds: int = 2
    app_args: dict[str, Any] = field(default_factory=dict)
    workdir: str = "/tmp/clip-bench-tenancy"


def _keys_file(path: Path) -> Path:
    big = 1_000_000_000
    path.write_text(yaml.safe_dump({"keys": [{
        "id": "key_bench", "secrets": [BENCH_SECRET], "requests_per_minute": big, "tokens_per_minute": big,
        "images_per_minute": big, "credit_usd": 1_000_000.0,
    }]}))
    return path


def run_tenancy(settings: TenancyBenchSettings) -> dict[str, Any]:
    from serve_app.bench.compare import CompareSettings, merge_args, our_app_args
    from serve_app.bench.cpu import _payload, closed_loop_args, serving_path_model, tree_cpu_s
    from serve_app.bench.loadgen import Level, LoadSettings, run_load, wait_until_serving
    from serve_app.bench.report import machine_info
    from serve_app.bench.servers import OurServer

    workdir = Path(settings.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, pretrained = serving_path_model(workdir, settings.model, settings.pretrained)
    base = closed_loop_args(our_app_args(CompareSettings(model=model, pretrained=pretrained,
                                                         threads=settings.threads, app_args=settings.app_args)),
                            settings.concurrency)
    tenancy = {"keys_file": str(_keys_file(workdir / "keys.yaml")), "redis_url": settings.redis_url,
               "database_url": settings.database_url}
    variants = {"off": (base, {}), "on": (merge_args(base, {"tenancy": tenancy}),
                                         {"Authorization": f"Bearer {BENCH_SECRET}"})}
    servers = {name: OurServer(workdir / name, args) for name, (args, _) in variants.items()}
    served = base["served_model_name"]
    rows: list[dict[str, Any]] = []
    try:
        for name, server in servers.items():
            server.start()
            headers = variants[name][1]
            wait_until_serving(server.base_url, _payload("text", 1, served), 600, server.process, headers=headers)
        for kind, items in settings.payloads:
            payload = _payload(kind, items, served)
            level = [Level(concurrency=settings.concurrency)]
            for round_index in range(settings.rounds):
                for name, server in servers.items():
                    load = LoadSettings(duration_s=settings.warmup_s, warmup_s=0.0, progress=False,
                                        headers=variants[name][1])
                    run_load(server.base_url, payload, level, load)
                    before, start = tree_cpu_s(server.process.pid), time.perf_counter()
                    load.duration_s = settings.duration_s
                    (result,) = run_load(server.base_url, payload, level, load)
                    cpu_s, wall_s = tree_cpu_s(server.process.pid) - before, time.perf_counter() - start
                    done = max(result.completed, 1)
                    rows.append({"tenancy": name, "payload": f"{kind} x{items}", "round": round_index + 1,
                                 "requests_per_s": round(done / wall_s, 1), "ok": result.ok,
                                 "completed": result.completed, "cpu_ms_per_request": round(1000 * cpu_s / done, 3),
                                 "errors": result.errors})
    finally:
        for server in servers.values():
            server.stop()
    return {"tool": "clip-bench tenancy", "settings": asdict(settings), "model": model, "machine": machine_info(),
            "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per payload: the runs' total requests/s and CPU per request of each variant, and on / off."""
    out: dict[str, dict[str, float]] = {}
    for payload in dict.fromkeys(r["payload"] for r in rows):
        mine = {v: [r for r in rows if r["payload"] == payload and r["tenancy"] == v] for v in ("off", "on")}
        if not mine["off"] or not mine["on"]:
            continue
        rps = {v: sum(r["requests_per_s"] for r in rs) / len(rs) for v, rs in mine.items()}
        cpu = {v: sum(r["cpu_ms_per_request"] for r in rs) / len(rs) for v, rs in mine.items()}
        out[payload] = {"requests_per_s_off": round(rps["off"], 1), "requests_per_s_on": round(rps["on"], 1),
                        "requests_per_s_on_over_off": round(rps["on"] / rps["off"], 3) if rps["off"] else 0.0,
                        "cpu_ms_per_request_off": round(cpu["off"], 3), "cpu_ms_per_request_on": round(cpu["on"], 3),
                        "tenancy_cpu_ms_per_request": round(cpu["on"] - cpu["off"], 3)}
    return out


def tenancy_table(report: dict[str, Any]) -> str:
    from serve_app.bench.report import format_table

    runs = format_table(["tenancy", "payload", "round", "requests/s", "CPU ms/request", "errors"],
                        [[r["tenancy"], r["payload"], r["round"], r["requests_per_s"], r["cpu_ms_per_request"],
                          ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"] for r in report["rows"]])
    summary = format_table(["payload", "requests/s off", "requests/s on", "on / off", "CPU ms/request off",
                            "CPU ms/request on", "tenancy's ms/request"],
                           [[p, s["requests_per_s_off"], s["requests_per_s_on"], s["requests_per_s_on_over_off"],
                             s["cpu_ms_per_request_off"], s["cpu_ms_per_request_on"], s["tenancy_cpu_ms_per_request"]]
                            for p, s in report["summary"].items()])
    return f"{runs}\n\n{summary}"
