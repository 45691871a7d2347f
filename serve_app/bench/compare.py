"""`compare`: bare, our service, the naive server and (when installed) infinity-emb, in one run.

The CPU speed of a shared machine drifts, so every served run is bracketed by bare runs: bare, server A,
bare, server B, bare, ... Each server's ratio to bare uses the mean of the bare runs just before and just
after it, and servers are compared with each other through those ratios as well as directly. Only one
server runs at a time, and none while bare runs, except once more beside each server while it idles
(`bare_beside_idle`): how much the mere presence of a server (its processes' wake-ups) slows the model.
"""

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from serve_app.bench.bare import BareModel, BareSettings, model_spec, reference, single_latency_ms
from serve_app.bench.loadgen import Level, LoadSettings, run_load
from serve_app.bench.payloads import ImagePayload, PayloadKind, TextPayload
from serve_app.bench.plot import save_figure
from serve_app.bench.report import fmt, format_table, git_state, loadavg, machine_info
from serve_app.bench.servers import InfinityServer, ManagedServer, NaiveServer, OurServer, find_infinity

SYSTEMS = ("ours", "ours-1p", "naive", "infinity")
OUR_SYSTEMS = ("ours", "ours-1p")  # the service in its default layout (three pools) and in `one-process`
SERVED_NAME = "bench"


@dataclass
class CompareSettings:
    model: str = "ViT-B-32"
    pretrained: str | None = "random"
    threads: int = 2
    levels: list[int] = field(default_factory=lambda: [1, 32])
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    width: int = 640
    height: int = 480
    jpeg_quality: int = 85
    distinct: int = 128
    load: LoadSettings = field(default_factory=lambda: LoadSettings(duration_s=15.0, warmup_s=3.0))
    bare: BareSettings = field(default_factory=BareSettings)
    app_args: dict[str, Any] = field(default_factory=dict)  # merged over the defaults of `our_app_args`
    import_path: str = "serve_app.app:build_app"  # our builder; any `module:builder` taking the same args
    pythonpath: str | None = None  # prepended to PYTHONPATH of our server (where such a builder lives)
    startup_timeout_s: float = 180.0
    infinity_bin: str = "infinity_emb"  # a path, or a name looked up on PATH
    infinity_batch_size: int = 32
    workdir: str | None = None
    bare_beside_idle: bool = True  # one more bare run beside each server once it is ready, before its load


# Where the service's default Ray CPU reservations exceed the machine's CPUs, `serve run` never schedules every
# replica and the app never serves. There the bench shrinks the two light pools' reservations (Ray's logical
# CPUs only; every process still runs on all cores, and no thread count changes).
SMALL_MACHINE_ARGS: dict[str, Any] = {"preprocessor": {"num_cpus": 0.5}, "ingress": {"num_cpus": 0.25}}


def default_cpu_reservation(args: dict[str, Any]) -> float:
    """Logical CPUs that the service's own defaults reserve for these args (1 where a pool sets none)."""
    from serve_app.config import AppArgs

    app = AppArgs.model_validate(args)
    pools = [app.preprocessor, app.ingress, *(spec.encoder for spec in app.model_specs())]
    return sum(1.0 if pool.num_cpus is None else pool.num_cpus for pool in pools)


def our_app_args(settings: CompareSettings) -> dict[str, Any]:
    """`build_app` args for the run: the service's defaults, the model, the bench's threads; then overrides."""
    import os

    args: dict[str, Any] = {
        "model": settings.model,
        "served_model_name": SERVED_NAME,
        "torch_threads": settings.threads,
    }
    if settings.pretrained:
        args["pretrained"] = settings.pretrained
    if default_cpu_reservation(merge_args(args, settings.app_args)) > (os.cpu_count() or 1):
        args = merge_args(args, SMALL_MACHINE_ARGS)
    return merge_args(args, settings.app_args)


def one_process_app_args(settings: CompareSettings) -> dict[str, Any]:
    """`our_app_args` in the one-process layout, which has only the encoder pool's settings."""
    args = {k: v for k, v in our_app_args(settings).items() if k not in ("preprocessor", "ingress")}
    return {**args, "layout": "one-process"}


def merge_args(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, dicts merged key by key at every depth."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_args(merged[key], value)
        else:
            merged[key] = value
    return merged


def _payload(modality: str, settings: CompareSettings) -> PayloadKind:
    if modality == "image":
        payload: PayloadKind = ImagePayload(
            model=SERVED_NAME, width=settings.width, height=settings.height, quality=settings.jpeg_quality,
            distinct=settings.distinct,
        )
    else:
        payload = TextPayload(model=SERVED_NAME, distinct=settings.distinct)
    return payload.prepare()


def _server(system: str, settings: CompareSettings, workdir: Path) -> ManagedServer:
    if system in OUR_SYSTEMS:
        env = None
        if settings.pythonpath:
            import os

            env = {"PYTHONPATH": os.pathsep.join(p for p in (settings.pythonpath, os.environ.get("PYTHONPATH")) if p)}
        args = our_app_args(settings) if system == "ours" else one_process_app_args(settings)
        return OurServer(workdir / system, args, import_path=settings.import_path, env=env)
    if system == "naive":
        return NaiveServer(workdir / "naive", settings.model, settings.pretrained, settings.threads, SERVED_NAME)
    if system == "infinity":
        binary = find_infinity(settings.infinity_bin)
        if binary is None:
            raise RuntimeError("infinity-emb is not installed")
        return InfinityServer(workdir / "infinity", binary, SERVED_NAME, settings.infinity_batch_size)
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")


def _log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_compare(settings: CompareSettings) -> dict[str, Any]:
    """Runs everything; returns the JSON-ready result (tables are built from it by `compare_tables`)."""
    systems = list(settings.systems)
    if "infinity" in systems and find_infinity(settings.infinity_bin) is None:
        _log(f"infinity-emb not found (--infinity-bin {settings.infinity_bin}): skipping it")
        systems.remove("infinity")
    if "infinity" in systems and settings.model.replace("/", "-") != "ViT-B-32":
        _log("infinity serves a random HF CLIP of ViT-B/32 size only: skipping it for this model")
        systems.remove("infinity")
    machine = machine_info()  # the load average before anything of ours runs
    git = git_state()  # the service measured is the one checked out at the start
    workdir = Path(settings.workdir or tempfile.mkdtemp(prefix="clip-bench-"))
    payloads = {m: _payload(m, settings) for m in settings.modalities}
    levels = [Level(concurrency=c) for c in settings.levels]

    _log(f"loading the bare model {settings.model} ({settings.threads} threads)")
    # bare runs the model with the kernels the service is configured with (`--app-args` reaches both)
    from serve_app.config import AppArgs

    kernels = AppArgs.model_validate(our_app_args(settings)).model_specs()[0].cpu_kernels
    bare = BareModel(model_spec(settings.model, settings.pretrained, settings.threads, cpu_kernels=kernels),
                     settings.bare)
    bare_runs = [bare.run(tuple(settings.modalities))]
    _log("bare run 0 done")
    served: dict[str, Any] = {}
    for system in systems:
        server = _server(system, settings, workdir)
        entry: dict[str, Any] = {"bare_before": len(bare_runs) - 1}
        _log(f"starting {system} on {server.base_url} (log: {server.log_path})")
        try:
            server.start()
            entry["startup_s"] = round(server.wait_ready(payloads[settings.modalities[0]], settings.startup_timeout_s), 2)
            entry["rss_ready"] = server.rss()
            _log(f"{system} serving after {entry['startup_s']}s")
            if settings.bare_beside_idle:
                entry["bare_beside_idle"] = bare.run(tuple(settings.modalities))
                _log(f"bare run beside idle {system} done")
            entry["modalities"] = {}
            for modality in settings.modalities:
                results = run_load(server.base_url, payloads[modality], levels, settings.load)
                entry["modalities"][modality] = [r.to_dict() for r in results]
                for r in results:
                    _log(f"{system} {modality} c={r.concurrency}: {r.items_per_s:.2f} items/s, "
                         f"p50 {fmt(r.latency_ms['p50'])} ms, errors {r.errors or 0}")
            entry["rss_after_load"] = server.rss()
        except Exception as exc:
            entry["error"] = str(exc)
            _log(f"{system} failed: {exc}")
        finally:
            server.stop()
        entry["command"] = server.command()
        if isinstance(server, OurServer):
            entry["app_args"] = server.app_args
            entry["import_path"] = server.import_path
            entry["ray_env"] = {k: server.env[k] for k in sorted(server.env) if k.startswith("RAY_SERVE_")}
        served[system] = entry
        bare_runs.append(bare.run(tuple(settings.modalities)))
        entry["bare_after"] = len(bare_runs) - 1
        _log(f"bare run {len(bare_runs) - 1} done")
    return {
        "tool": "clip-bench compare",
        "settings": {**asdict(settings), "systems": systems},
        "machine": machine,
        "git": git,
        "loadavg_end": loadavg(),
        "bare_load_seconds": round(bare.load_seconds, 2),
        "bare_runs": bare_runs,
        "served": served,
        "workdir": str(workdir),
    }


# ------------------------------------------------------------------ tables


def _bare_ref(result: dict[str, Any], indices: list[int], modality: str, concurrency: int) -> float | None:
    refs = [reference(result["bare_runs"][i], modality, concurrency) for i in indices]
    refs = [r for r in refs if r is not None]
    return sum(refs) / len(refs) if refs else None


def _level(entry: dict[str, Any], modality: str, concurrency: int) -> dict[str, Any] | None:
    for level in entry.get("modalities", {}).get(modality, []):
        if level["concurrency"] == concurrency:
            return level
    return None


def compare_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (modality, concurrency, system), with bracketed ratios to bare and to each other."""
    settings = result["settings"]
    all_bare = list(range(len(result["bare_runs"])))
    rows: list[dict[str, Any]] = []
    for modality in settings["modalities"]:
        for c in settings["levels"]:
            bare_mean = _bare_ref(result, all_bare, modality, c)
            bare_batch = max(
                (r for r in result["bare_runs"][0]["results"] if r["modality"] == modality and r["batch"] <= c),
                key=lambda r: r["items_per_s"], default=None,
            )
            refs = [reference(b, modality, c) for b in result["bare_runs"]]
            refs = [r for r in refs if r is not None]
            rows.append({
                "modality": modality, "concurrency": c, "system": "bare",
                "items_per_s": bare_mean, "x_bare": 1.0 if bare_mean else None,
                "p50_ms": bare_batch["batch_latency_ms"]["p50"] if bare_batch else None,
                "p95_ms": bare_batch["batch_latency_ms"]["p95"] if bare_batch else None,
                "p99_ms": bare_batch["batch_latency_ms"]["p99"] if bare_batch else None,
                "errors": {}, "note": f"batch {bare_batch['batch']}; bare runs {min(refs):.2f}-{max(refs):.2f}/s"
                if bare_batch and refs else "",
            })
            for system, entry in result["served"].items():
                level = _level(entry, modality, c)
                if level is None:
                    rows.append({"modality": modality, "concurrency": c, "system": system, "items_per_s": None,
                                 "x_bare": None, "p50_ms": None, "p95_ms": None, "p99_ms": None, "errors": {},
                                 "note": "failed (see the JSON)" if "error" in entry else "not measured"})
                    continue
                bracket = _bare_ref(result, [entry["bare_before"], entry["bare_after"]], modality, c)
                rows.append({
                    "modality": modality, "concurrency": c, "system": system,
                    "items_per_s": level["items_per_s"],
                    "x_bare": level["items_per_s"] / bracket if bracket else None,
                    "p50_ms": level["latency_ms"]["p50"], "p95_ms": level["latency_ms"]["p95"],
                    "p99_ms": level["latency_ms"]["p99"], "errors": level["errors"],
                    "note": f"bracket bare {bracket:.2f}/s" if bracket else "",
                })
    # ratios to each other: through the bracketed ratios (drift-corrected)
    for row in rows:
        for other in SYSTEMS:
            peer = next((r for r in rows if r["system"] == other and r["modality"] == row["modality"]
                         and r["concurrency"] == row["concurrency"]), None)
            if peer is not None and peer["x_bare"] and row["x_bare"] is not None and row["system"] != other:
                row[f"x_{other}"] = row["x_bare"] / peer["x_bare"]
    return rows


def compare_tables(result: dict[str, Any]) -> str:
    rows = compare_rows(result)
    systems = [s for s in SYSTEMS if s in result["served"]]
    headers = ["modality", "c", "system", "items/s", "× bare", *(f"× {s}" for s in systems),
               "p50 ms", "p95 ms", "p99 ms", "errors", "note"]
    body = []
    for r in rows:
        body.append([
            r["modality"], r["concurrency"], r["system"], fmt(r["items_per_s"], 2), fmt(r["x_bare"], 2),
            *(fmt(r.get(f"x_{s}"), 2) if r["system"] != s else "" for s in systems),
            fmt(r["p50_ms"]), fmt(r["p95_ms"]), fmt(r["p99_ms"]),
            ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "0", r["note"],
        ])
    out = [format_table(headers, body), ""]
    startup = []
    for system, entry in result["served"].items():
        rss = entry.get("rss_after_load") or entry.get("rss_ready") or []
        replicas = [p for p in rss if "ServeReplica" in p["cmd"]] or rss[:1]
        startup.append([
            system, fmt(entry.get("startup_s"), 1),
            "; ".join(f"{_short(p['cmd'])} {p['rss_mib'] / 1024:.2f}" for p in replicas),
            f"{sum(p['rss_mib'] for p in rss) / 1024:.2f}" if rss else "",
        ])
    out.append(format_table(["system", "startup s", "RSS per replica GiB", "RSS all processes GiB"], startup))
    idle = idle_rows(result)
    if idle:
        out += ["", "Bare beside each server while it idles (its processes' wake-ups share the cores):", ""]
        out.append(format_table(
            ["modality", "c", "beside", "bare items/s", "× bare alone"],
            [[r["modality"], r["concurrency"], r["system"], fmt(r["items_per_s"], 2), fmt(r["x_bare"], 2)] for r in idle],
        ))
    latency = latency_rows(result)
    if latency:
        out += ["", "Median latency at concurrency 1 over the bare single-item pass (the serving path's own time):", ""]
        out.append(format_table(
            ["modality", "system", "p50 ms", "bare single p50 ms", "over bare ms"],
            [[r["modality"], r["system"], fmt(r["p50_ms"]), fmt(r["bare_ms"]), fmt(r["over_ms"])] for r in latency],
        ))
    return "\n".join(out)


def idle_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Bare beside each idle server, as a ratio to the bare runs alone that bracket that server."""
    rows = []
    for modality in result["settings"]["modalities"]:
        for c in result["settings"]["levels"]:
            for system, entry in result["served"].items():
                if "bare_beside_idle" not in entry:
                    continue
                beside = reference(entry["bare_beside_idle"], modality, c)
                alone = _bare_ref(result, [entry["bare_before"], entry["bare_after"]], modality, c)
                rows.append({"modality": modality, "concurrency": c, "system": system, "items_per_s": beside,
                             "x_bare": beside / alone if beside is not None and alone else None})
    return rows


def _short(cmd: str) -> str:
    if "ServeReplica:" in cmd:
        return cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
    return cmd.split()[0].rsplit("/", 1)[-1] if cmd else "?"


def latency_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each served system's p50 at concurrency 1 against the bare batch-1 pass's p50 (the mean over the bare runs
    that bracket that system): what serving one request costs beyond the model's own pass. Only where c=1 ran."""
    if 1 not in result["settings"]["levels"]:
        return []
    rows = []
    for modality in result["settings"]["modalities"]:
        for system, entry in result["served"].items():
            level = _level(entry, modality, 1)
            singles = [single_latency_ms(result["bare_runs"][i], modality)
                       for i in (entry["bare_before"], entry["bare_after"])]
            singles = [v for v in singles if v is not None]
            if level is None or level["latency_ms"]["p50"] is None or not singles:
                continue
            bare_ms = sum(singles) / len(singles)
            rows.append({"modality": modality, "system": system, "p50_ms": level["latency_ms"]["p50"],
                         "bare_ms": bare_ms, "over_ms": level["latency_ms"]["p50"] - bare_ms})
    return rows


def plot_compare(result: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: items/s as a multiple of bare, per system, for every (modality, concurrency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in compare_rows(result)]
    groups = [(m, c) for m in result["settings"]["modalities"] for c in result["settings"]["levels"]]
    systems = ["bare", *result["served"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    width = 0.8 / len(systems)
    for k, system in enumerate(systems):
        values = []
        for m, c in groups:
            row = next((r for r in rows if r["system"] == system and r["modality"] == m and r["concurrency"] == c), None)
            values.append(row["x_bare"] if row and row["x_bare"] else 0.0)
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=system)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{m}\nc={c}" for m, c in groups])
    ax.set_ylabel("throughput ÷ bare (bracketed)")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_title(f"{result['settings']['model']} on {result['machine']['cpus']} CPUs")
    ax.legend()
    return save_figure(fig, path)
