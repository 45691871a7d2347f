"""Prep mode: preprocessing throughput per core, by photo size, format and decode path.

What one Preprocessor replica runs per image, in this process: the service's own `ModelPreprocessing.pixels`
(data URI -> base64 -> decode, at a reduced scale with `image_decode: fast` -> EXIF orientation -> open_clip's
resize and crop -> uint8 pixels), on one thread per core. From the one-thread rate it gives the cores one GPU
needs at a given encoder rate. Exact and fast run side by side in every round, and rounds repeat, so that
their ratio holds on a shared, noisy machine.

`ingress`: what the ingress spends on such a request before the preprocessing pool sees it (JSON parse by
the request model, `collect_inputs`, the hand-off's serialisation), next to the preprocessing cost.

`replicas`: the preprocessing pool itself on Ray Serve: a Preprocessor deployment per replica count (each
replica `replica_cpus` CPUs, so one decode thread per CPU, as in the service), driven through its handle by
two callers per replica; images/s of each count, alternating in every round.
"""

import asyncio
import io
import json
import os
import pickle
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serve_app.bench.payloads import jpeg_data_uri, synthetic_jpeg
from serve_app.bench.report import loadavg, machine_info

# images/s of ViT-g/14 in bf16 on one H200: an estimate (roughly 534 GFLOP per image at ~55% of the H200's
# 989 dense bf16 TFLOP/s), not a measurement; no GPU run of this service exists yet. Pass `--encoder-rate`.
DEFAULT_ENCODER_RATE = 1000.0
DEFAULT_SIZES = [(640, 480), (1920, 1080), (4000, 3000)]


@dataclass
class PrepSettings:
    model: str = "ViT-g-14"
    pretrained: str | None = None
    sizes: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_SIZES))
    formats: list[str] = field(default_factory=lambda: ["jpeg", "png"])
    decodes: list[str] = field(default_factory=lambda: ["exact", "fast"])
    threads: list[int] = field(default_factory=lambda: [1])
    quality: int = 90
    distinct: int = 2  # distinct images per size and format, cycled through
    min_seconds: float = 2.0  # per measurement
    min_images: int = 3  # per thread and measurement
    rounds: int = 3  # every cell measured once per round; the median is reported
    encoder_rate: float | None = None  # images/s of one GPU; None: DEFAULT_ENCODER_RATE, an estimate
    ingress: bool = False
    ingress_repeats: int = 20
    replicas: list[int] = field(default_factory=list)  # preprocessing-pool replica counts to measure; none: skip
    replica_cpus: float = 1.0


def photo(width: int, height: int, fmt: str, seed: int, quality: int = 90) -> bytes:
    """A photo-like image (smooth fields, shapes, mild noise) as JPEG, or the same pixels as PNG."""
    jpeg = synthetic_jpeg(width, height, seed=seed, quality=quality)
    if fmt == "jpeg":
        return jpeg
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(raw: bytes, fmt: str) -> str:
    return jpeg_data_uri(raw) if fmt == "jpeg" else jpeg_data_uri(raw).replace("image/jpeg", "image/png", 1)


def preprocessing(model: str, pretrained: str | None, decode: str) -> Any:
    """The service's own per-model preprocessing (no weights are loaded), with limits that admit 12 MP PNGs."""
    from serve_app.config import ImageLimits, ModelSpec
    from serve_app.preprocess import ModelPreprocessing

    spec = ModelSpec(model=model, pretrained=pretrained, image_decode=decode)  # type: ignore[arg-type]
    return ModelPreprocessing(spec, ImageLimits(max_image_bytes=256 * 1024 * 1024))


def images_per_second(pre: Any, uris: list[str], threads: int, min_seconds: float, min_images: int) -> dict[str, Any]:
    """`threads` threads each preprocess images one after another until the window closes. Besides wall-clock
    images/s, the images per CPU-second the threads themselves spent (their `thread_time`): the per-core rate,
    which other processes on a shared machine slow far less than the wall clock."""
    from serve_app.openmp import keep_torch_serial_on_this_thread

    deadline = time.perf_counter() + min_seconds

    def worker(k: int) -> tuple[int, float]:
        keep_torch_serial_on_this_thread()  # as a Preprocessor replica's decode threads
        cpu = time.thread_time()
        done = 0
        while done < min_images or time.perf_counter() < deadline:
            pre.pixels(uris[(k + done * threads) % len(uris)], "input[0]")
            done += 1
        return done, time.thread_time() - cpu

    start = time.perf_counter()
    with ThreadPoolExecutor(threads, thread_name_prefix="prep-bench") as pool:
        counts, cpu = zip(*pool.map(worker, range(threads)))
    elapsed = time.perf_counter() - start
    return {"images": sum(counts), "seconds": elapsed, "images_per_s": sum(counts) / elapsed,
            "cpu_seconds": sum(cpu), "images_per_cpu_s": sum(counts) / max(sum(cpu), 1e-9)}


def difference(exact: Any, fast: Any, uris: list[str]) -> dict[str, float]:
    """Mean and max |fast - exact| of the normalised tensors the encoder sees (open_clip's Normalize)."""
    import numpy as np

    std = np.asarray(exact.pipeline.std, dtype=np.float32).reshape(3, 1, 1)  # the mean cancels in a difference
    diffs = [np.abs((fast.pixels(u, "x").astype(np.float32) - exact.pixels(u, "x").astype(np.float32)) / 255 / std)
             for u in uris]
    return {"mean_abs": float(np.mean([d.mean() for d in diffs])), "max_abs": float(max(d.max() for d in diffs))}


def run_prep(settings: PrepSettings) -> dict[str, Any]:
    s = settings
    encoder_rate = s.encoder_rate or DEFAULT_ENCODER_RATE
    started = time.perf_counter()
    pres = {d: preprocessing(s.model, s.pretrained, d) for d in dict.fromkeys(["exact", *s.decodes])}
    cells = []  # (fmt, (w, h), uris, raw sizes)
    for fmt in s.formats:
        for width, height in s.sizes:
            raws = [photo(width, height, fmt, seed=20_000 + i, quality=s.quality) for i in range(s.distinct)]
            cells.append((fmt, (width, height), [data_uri(r, fmt) for r in raws], [len(r) for r in raws]))
    setup_s = time.perf_counter() - started

    def decodes_of(fmt: str) -> list[str]:
        return s.decodes if fmt == "jpeg" else ["exact"]  # fast changes JPEGs only

    samples: dict[tuple, list[float]] = {}  # wall-clock images/s
    cpu_samples: dict[tuple, list[float]] = {}  # images per CPU-second of the decoding threads
    busy: dict[tuple, list[float]] = {}  # CPU-seconds per wall second: cores the threads kept busy
    for _ in range(s.rounds):
        for fmt, size, uris, _ in cells:
            for threads in s.threads:
                for decode in decodes_of(fmt):  # exact and fast side by side, in every round
                    pres[decode].pixels(uris[0], "warm-up")
                    m = images_per_second(pres[decode], uris, threads, s.min_seconds, s.min_images)
                    samples.setdefault((fmt, size, decode, threads), []).append(m["images_per_s"])
                    cpu_samples.setdefault((fmt, size, decode, threads), []).append(m["images_per_cpu_s"])
                    busy.setdefault((fmt, size, decode, threads), []).append(m["cpu_seconds"] / m["seconds"])

    results = []
    for fmt, (width, height), uris, raw_sizes in cells:
        exact_rates = {t: statistics.median(samples[(fmt, (width, height), "exact", t)]) for t in s.threads}
        exact_cpu_rates = {t: statistics.median(cpu_samples[(fmt, (width, height), "exact", t)]) for t in s.threads}
        for decode in decodes_of(fmt):
            pre = pres[decode]
            decoded = pre.decode(uris[0], "x").size
            for threads in s.threads:
                key = (fmt, (width, height), decode, threads)
                rates = samples[key]
                rate = statistics.median(rates)
                cpu_rate = statistics.median(cpu_samples[key])
                row: dict[str, Any] = {
                    "format": fmt, "width": width, "height": height,
                    "decode": decode if fmt == "jpeg" else "exact=fast",
                    "threads": threads, "images_per_s": rate, "images_per_s_per_thread": rate / threads,
                    "rounds": [round(r, 2) for r in rates],
                    "encoded_bytes": int(statistics.mean(raw_sizes)), "base64_chars": len(uris[0]),
                    "decoded_size": list(decoded),
                    "speedup_vs_exact": rate / exact_rates[threads],
                    "images_per_cpu_s": cpu_rate, "cpu_ms_per_image": 1000 / cpu_rate,
                    "cpu_speedup_vs_exact": cpu_rate / exact_cpu_rates[threads],
                    "cores_busy": statistics.median(busy[key]),
                }
                if threads == min(s.threads):
                    row["cores_per_gpu"] = encoder_rate / cpu_rate  # from the CPU-time rate: one core's
                if threads != min(s.threads):
                    base = statistics.median(samples[(fmt, (width, height), decode, min(s.threads))])
                    row["scaling_vs_fewest_threads"] = rate / base
                if decode == "fast" and fmt == "jpeg":
                    row["difference_vs_exact"] = difference(pres["exact"], pre, uris)
                results.append(row)

    report: dict[str, Any] = {
        "mode": "prep", "model": s.model, "image_size": list(pres["exact"].config.image_size),
        "draft_size": 2 * max(pres["exact"].config.image_size), "jpeg_quality": s.quality, "distinct": s.distinct,
        "rounds": s.rounds, "min_seconds": s.min_seconds, "encoder_rate": encoder_rate,
        "encoder_rate_source": "--encoder-rate" if s.encoder_rate else
        "an estimate for ViT-g/14 bf16 on one H200; no GPU run measured yet",
        "setup_seconds": round(setup_s, 1), "machine": machine_info(), "loadavg_after": loadavg(), "results": results,
    }
    if s.replicas:
        report["pool"] = pool_rates(s, [c for c in cells if c[0] == "jpeg"])
    if s.ingress:
        report["ingress"] = ingress_costs(s, cells, {r["width"]: r for r in results
                                                     if r["format"] == "jpeg" and r["decode"] == "exact"
                                                     and r["threads"] == min(s.threads)})
    return report


def pool_rates(s: PrepSettings, cells: list) -> list[dict[str, Any]]:
    """Images/s of the Preprocessor pool on Ray Serve by replica count, per JPEG size and decode path. Uses the
    process's Ray when it has one (the tests), else starts one with the serving environment."""
    import ray
    from ray import serve

    from serve_app.config import ImageLimits, ModelSpec
    from serve_app.preprocess import Preprocessor
    from serve_app.ray_env import free_port, use_one_machine_env

    started_ray = not ray.is_initialized()
    if started_ray:
        use_one_machine_env()  # before ray.init: the processes Ray starts inherit it
        ray.init(address="local", num_cpus=max(len(s.decodes) * sum(s.replicas) * s.replica_cpus, 1),
                 include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    limits = ImageLimits(max_image_bytes=256 * 1024 * 1024)
    apps = {}
    caller = None
    try:
        for decode in s.decodes:
            spec = ModelSpec(model=s.model, pretrained=s.pretrained, image_decode=decode)  # type: ignore[arg-type]
            for replicas in s.replicas:
                app = Preprocessor.options(
                    num_replicas=replicas, max_ongoing_requests=4, ray_actor_options={"num_cpus": s.replica_cpus},
                ).bind([spec], limits, num_cpus=s.replica_cpus)
                name = f"prep-bench-{decode}-{replicas}"
                apps[(decode, replicas)] = (spec.name, name)  # before it starts: deleted even if it fails to
                serve.run(app, name=name, route_prefix=None)

        # The callers live in an actor of their own: a handle's router runs on its caller's event loop in Ray
        # Serve's throughput mode, and an actor's loop lasts as long as the calls need it
        caller = ray.remote(num_cpus=0)(PoolCaller).remote()
        samples: dict[tuple, list[dict[str, float]]] = {}
        for _ in range(s.rounds):
            for _fmt, size, uris, _ in cells:
                for (decode, replicas), (model, name) in apps.items():
                    samples.setdefault((size, decode, replicas), []).append(
                        ray.get(caller.measure.remote(name, model, uris, 2 * replicas, s.min_seconds)))
    finally:
        if caller is not None:
            ray.kill(caller)
        for _, name in apps.values():
            serve.delete(name)
        if started_ray:
            serve.shutdown()
            ray.shutdown()
    rows = []
    for (size, decode, replicas), rates in samples.items():
        base = statistics.median(r["images_per_s"] for r in samples[(size, decode, min(s.replicas))])
        rate = statistics.median(r["images_per_s"] for r in rates)
        rows.append({"width": size[0], "height": size[1], "decode": decode, "replicas": replicas,
                     "replica_cpus": s.replica_cpus, "images_per_s": rate, "rounds": [round(r["images_per_s"], 2)
                                                                                         for r in rates],
                     "machine_cores_busy": statistics.median(r["machine_cores_busy"] for r in rates),
                     "callers_cores_busy": statistics.median(r["callers_cores_busy"] for r in rates),
                     "scaling_vs_fewest_replicas": rate / base})
    return rows


def _busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [float(x) for x in stat.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class PoolCaller:
    """Callers of one Preprocessor app, in a process of their own (a Ray actor): its CPU time is theirs."""

    async def measure(self, app: str, model: str, uris: list[str], callers: int, min_seconds: float
                      ) -> dict[str, float]:
        """`callers` callers each send one image after another until the window closes; with the cores the
        machine kept busy meanwhile and those of the callers (on a small machine they share the replicas')."""
        from ray import serve

        handle = serve.get_app_handle(app)
        await handle.images.remote(model, [uris[0]], ["warm-up"])
        deadline = time.perf_counter() + min_seconds
        machine, own = _busy_cpu_seconds(), time.process_time()

        async def caller(k: int) -> int:
            done = 0
            while done < 1 or time.perf_counter() < deadline:
                await handle.images.remote(model, [uris[(k + done) % len(uris)]], ["input[0]"])
                done += 1
            return done

        start = time.perf_counter()
        images = sum(await asyncio.gather(*(caller(k) for k in range(callers))))
        elapsed = time.perf_counter() - start
        return {"images_per_s": images / elapsed, "machine_cores_busy": (_busy_cpu_seconds() - machine) / elapsed,
                "callers_cores_busy": (time.process_time() - own) / elapsed}


def _median_ms(fn: Any, repeats: int) -> float:
    """Median CPU milliseconds of this thread per call (steady under other processes' load)."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return 1000 * statistics.median(times)


def ingress_costs(s: PrepSettings, cells: list, exact_rows: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per request with one image: the ingress's parse (FastAPI: `json.loads`, then the request model), the
    alternative `model_validate_json`, `collect_inputs`, and the hand-off's serialisation (Ray pickles a call's
    arguments, protocol 5: one copy out on the ingress, one in on the preprocessor)."""
    from serve_app.config import ImageLimits
    from serve_app.imaging import decode_base64
    from serve_app.inputs import collect_inputs
    from serve_app.protocol import EmbeddingRequest

    limits = ImageLimits(max_image_bytes=256 * 1024 * 1024)
    rows = []
    for fmt, (width, height), uris, _ in cells:
        if fmt != "jpeg":
            continue
        body = json.dumps({"model": s.model, "input": [uris[0]], "modality": "image",
                           "encoding_format": "float"}).encode()
        request = EmbeddingRequest.model_validate_json(body)
        inputs = collect_inputs(request, 2048)
        args = (s.model, [x.data for x in inputs], [x.param for x in inputs])  # ClipService._embed_images
        wire = pickle.dumps(args, protocol=5)
        n = s.ingress_repeats
        fastapi_ms = _median_ms(lambda: EmbeddingRequest.model_validate(json.loads(body)), n)
        row: dict[str, Any] = {
            "width": width, "height": height, "body_bytes": len(body),
            "fastapi_parse_ms": fastapi_ms,
            "model_validate_json_ms": _median_ms(lambda: EmbeddingRequest.model_validate_json(body), n),
            "collect_inputs_ms": _median_ms(lambda: collect_inputs(request, 2048), n),
            "handoff_pickle_dumps_ms": _median_ms(lambda: pickle.dumps(args, protocol=5), n),
            "handoff_pickle_loads_ms": _median_ms(lambda: pickle.loads(wire), n),
            "base64_decode_ms": _median_ms(lambda: decode_base64(uris[0], "input[0]", limits), n),
            "collect_inputs_keeps_the_string": inputs[0].data is request.input[0],  # type: ignore[index]
        }
        row["ingress_total_ms"] = fastapi_ms + row["collect_inputs_ms"] + row["handoff_pickle_dumps_ms"]
        exact = exact_rows.get(width)
        if exact is not None:
            row["exact_preprocess_ms_per_core"] = exact["cpu_ms_per_image"]
            row["ingress_share_of_preprocess"] = row["ingress_total_ms"] / exact["cpu_ms_per_image"]
        rows.append(row)
    return rows


def prep_tables(report: dict[str, Any]) -> str:
    from serve_app.bench.report import fmt, format_table

    rows = []
    for r in report["results"]:
        diff = r.get("difference_vs_exact")
        rows.append([
            f"{r['format'].upper()} {r['width']}x{r['height']}", r["decode"], r["threads"],
            f"{r['decoded_size'][0]}x{r['decoded_size'][1]}", fmt(r["images_per_cpu_s"], 1),
            fmt(r["cpu_speedup_vs_exact"], 2), fmt(r.get("cores_per_gpu"), 0) if "cores_per_gpu" in r else "",
            fmt(r["images_per_s"], 1), fmt(r.get("scaling_vs_fewest_threads"), 2), fmt(r["cores_busy"], 2),
            f"{diff['mean_abs']:.4f} / {diff['max_abs']:.3f}" if diff else "",
        ])
    table = format_table(["input", "decode", "threads", "decoded", "images/CPU-s", "× exact",
                          f"cores/GPU @{report['encoder_rate']:g}/s", "wall images/s", "× fewest threads",
                          "cores busy", "|fast-exact| mean/max"], rows)
    if "ingress" in report:
        ingress_rows = [[f"JPEG {r['width']}x{r['height']}", f"{r['body_bytes'] / 1e6:.2f}",
                         fmt(r["fastapi_parse_ms"], 2),
                         fmt(r["model_validate_json_ms"], 2), fmt(r["collect_inputs_ms"], 3),
                         fmt(r["handoff_pickle_dumps_ms"], 2), fmt(r["handoff_pickle_loads_ms"], 2),
                         fmt(r["base64_decode_ms"], 2), fmt(r["ingress_total_ms"], 2),
                         fmt(r.get("exact_preprocess_ms_per_core"), 1)] for r in report["ingress"]]
        table += "\n\n" + format_table(
            ["body", "MB", "parse ms (FastAPI)", "validate_json ms", "collect ms", "pickle out ms", "pickle in ms",
             "base64 ms (prep)", "ingress ms", "exact prep ms"], ingress_rows)
        table += "\n(CPU milliseconds per request with one image; ingress = FastAPI parse + collect + pickle out)"
    if "pool" in report:
        pool_rows = [[f"JPEG {r['width']}x{r['height']}", r["decode"], r["replicas"], fmt(r["replica_cpus"], 1),
                      fmt(r["images_per_s"], 1), fmt(r["scaling_vs_fewest_replicas"], 2),
                      fmt(r["machine_cores_busy"], 2), fmt(r["callers_cores_busy"], 2),
                      " ".join(f"{x:g}" for x in r["rounds"])] for r in report["pool"]]
        table += "\n\n" + format_table(["pool input", "decode", "replicas", "CPUs each", "images/s",
                                         "× fewest replicas", "machine cores busy", "callers' cores", "rounds"],
                                        pool_rows)
        table += "\n(the Preprocessor deployment on Ray Serve, two callers per replica through its handle)"
    return table
