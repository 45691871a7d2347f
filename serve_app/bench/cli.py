"""`clip-bench`: bare, prep, load, compare and gpu (see the package docstring and BENCHMARKS.md).

    clip-bench bare --model ViT-B-32 --pretrained random --threads 2
    clip-bench prep --threads 1,2 --ingress
    clip-bench load --url http://127.0.0.1:8000 --model vitb32 --payload image --concurrency 1,8,32
    clip-bench compare --model ViT-B-32 --pretrained random --levels 1,32
    clip-bench step --model ViT-B-32 --pretrained random --payload text --steps 1:30,16:120,1:120
    clip-bench soak --model ViT-B-32 --pretrained random --minutes 10 --concurrency 2
    clip-bench bulk --model ViT-B-32 --pretrained random --images 128 --texts 1024 --lines 10000,50000
    clip-bench gpu --smoke
    clip-bench checkpoint /tmp/vitg14-random --arch ViT-g-14
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench-out")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _out_paths(args: argparse.Namespace, mode: str) -> tuple[Path, Path]:
    base = Path(args.out) if args.out else DEFAULT_OUT / f"{mode}-{_stamp()}.json"
    return base, base.with_suffix(".png")


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ViT-B-32", help="open_clip id: a built-in name, local-dir:/path, hf-hub:...")
    parser.add_argument("--pretrained", default="random", help="pretrained tag; 'random' (default) for random weights; "
                        "'' for none (local-dir/hf-hub)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch intra-op threads")


def _payload_list(text: str) -> list[tuple[str, int]]:
    """`KIND:ITEMS,...` (`text:1,image:8`) as (kind, items per request) pairs."""
    return [(kind, int(items)) for kind, _, items in (p.partition(":") for p in _strs(text))]


def _server_run_args(parser: argparse.ArgumentParser, mode: str) -> None:
    """What a mode that starts our service takes: its args, its working directory and where the JSON goes."""
    parser.add_argument("--app-args", default="{}", help="JSON merged over the service's args")
    parser.add_argument("--workdir", default=f"/tmp/clip-bench-{mode}")
    parser.add_argument("--out", default=None, help=f"JSON path (default bench-out/{mode}-<time>.json)")


def _load_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=15.0, help="measurement window per level, seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="load before each window, seconds (not counted)")
    parser.add_argument("--max-requests", type=int, default=None, help="close a level's window after this many")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--no-progress", action="store_true")


def _load_settings(args: argparse.Namespace) -> Any:
    from serve_app.bench.loadgen import LoadSettings

    return LoadSettings(duration_s=args.duration, warmup_s=args.warmup, max_requests=args.max_requests,
                        timeout_s=args.timeout, progress=not args.no_progress and sys.stderr.isatty())


def _pretrained(value: str | None) -> str | None:
    return value or None


# ------------------------------------------------------------------ bare


def cmd_bare(args: argparse.Namespace) -> int:
    from serve_app.bench.bare import BareModel, BareSettings, bare_report, model_spec
    from serve_app.bench.report import fmt, format_table, write_json

    width, height = _size(args.image_size)
    settings = BareSettings(image_batches=_ints(args.image_batches), text_batches=_ints(args.text_batches),
                            min_seconds=args.min_seconds, min_iterations=args.min_iterations,
                            warmup_iterations=args.warmup_iterations, width=width, height=height)
    spec = model_spec(args.model, _pretrained(args.pretrained), args.threads, args.device, args.precision,
                      args.cpu_kernels)
    bare = BareModel(spec, settings)
    report = bare_report(bare.run(tuple(_strs(args.modalities))), settings)
    json_path, _ = _out_paths(args, "bare")
    write_json(json_path, report)
    rows = [[r["modality"], r["batch"], fmt(r["items_per_s"], 2), fmt(r["batch_latency_ms"]["p50"]),
             fmt(r["batch_latency_ms"]["p95"]), r["iterations"]] for r in report["results"]]
    print(format_table(["modality", "batch", "items/s", "batch p50 ms", "batch p95 ms", "iterations"], rows))
    print(f"model {args.model} ({report['device']}, {report['precision']}, {report['kernels']} kernels, "
          f"{report['threads']} threads), "
          f"loaded in {report['load_seconds']}s; JSON: {json_path}")
    return 0


# ------------------------------------------------------------------ prep


def cmd_prep(args: argparse.Namespace) -> int:
    from serve_app.bench.prep import PrepSettings, prep_tables, run_prep
    from serve_app.bench.report import write_json

    settings = PrepSettings(
        model=args.model, pretrained=_pretrained(args.pretrained), sizes=[_size(x) for x in _strs(args.sizes)],
        formats=_strs(args.formats), decodes=_strs(args.decodes), threads=_ints(args.threads), quality=args.quality,
        distinct=args.distinct, min_seconds=args.min_seconds, min_images=args.min_images, rounds=args.rounds,
        encoder_rate=args.encoder_rate, ingress=args.ingress, replicas=_ints(args.replicas) if args.replicas else [],
        replica_cpus=args.replica_cpus,
    )
    report = run_prep(settings)
    report["command"] = " ".join(args.argv or ["clip-bench", *sys.argv[1:]])
    json_path, _ = _out_paths(args, "prep")
    write_json(json_path, report)
    print(prep_tables(report))
    print(f"model {args.model} ({report['image_size'][0]}x{report['image_size'][1]} input, fast decodes JPEGs to no "
          f"less than {report['draft_size']} px a side); encoder rate {report['encoder_rate']:g} images/s "
          f"({report['encoder_rate_source']}); JSON: {json_path}")
    return 0


# ------------------------------------------------------------------ load


def make_load_payload(args: argparse.Namespace, kind: str | None = None) -> Any:
    from serve_app.bench.payloads import make_payload

    width, height = _size(args.image_size)
    templates: Any = args.templates
    if templates and templates not in ("imagenet",):
        templates = [t for t in templates.split("|") if t]
    return make_payload(
        kind or args.payload, model=args.model, width=width, height=height, items_per_request=args.items_per_request,
        distinct=args.distinct, labels=args.labels, templates=templates or None, invalid_every=args.invalid_every,
        path=args.path,
    )


def cmd_load(args: argparse.Namespace) -> int:
    from serve_app.bench.loadgen import Level, load_report, run_load
    from serve_app.bench.plot import plot_load
    from serve_app.bench.report import fmt, format_table, write_json

    if (args.concurrency is None) == (args.rate is None):
        args.concurrency = args.concurrency or "1,8,32"
    levels = ([Level(rate=r) for r in _floats(args.rate)] if args.rate
              else [Level(concurrency=c) for c in _ints(args.concurrency)])
    settings = _load_settings(args)
    payload = make_load_payload(args).prepare()
    report: dict[str, Any] = {}
    if args.cold_first:
        # one request alone before any load: the cold cost (e.g. /v1/classify before its label cache is warm)
        from serve_app.bench.loadgen import LoadSettings

        cold = run_load(args.url, payload, [Level(concurrency=1)],
                        LoadSettings(duration_s=settings.timeout_s, warmup_s=0, max_requests=1,
                                     timeout_s=settings.timeout_s, progress=False))[0]
        report["cold_first_request"] = cold.to_dict()
    results = run_load(args.url, payload, levels, settings)
    report = {**load_report(args.url, payload, settings, results), **report}
    if args.compare_to:
        baseline_payload = make_load_payload(args, args.compare_to).prepare()
        baseline = run_load(args.url, baseline_payload, levels, settings)
        report["baseline"] = {"payload": baseline_payload.describe(), "levels": [r.to_dict() for r in baseline]}
        report["ratio_to_baseline"] = [
            {"level": lv.concurrency or lv.rate,
             "p50_latency": _ratio(r.latency_ms["p50"], b.latency_ms["p50"]),
             "requests_per_s": _ratio(r.requests_per_s, b.requests_per_s)}
            for lv, r, b in zip(levels, results, baseline)
        ]
    json_path, png_path = _out_paths(args, "load")
    write_json(json_path, report)
    if not args.no_plot:
        plot_load(report, png_path)
    rows = [[r.concurrency if r.concurrency is not None else f"{r.rate:g}/s", fmt(r.requests_per_s, 2),
             fmt(r.items_per_s, 2), fmt(r.latency_ms["p50"]), fmt(r.latency_ms["p95"]), fmt(r.latency_ms["p99"]),
             r.ok, ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or "0"] for r in results]
    print(format_table(["level", "req/s", "items/s", "p50 ms", "p95 ms", "p99 ms", "ok", "errors"], rows))
    for ratio in report.get("ratio_to_baseline", []):
        print(f"level {ratio['level']}: {args.payload} ÷ {args.compare_to}: p50 latency × {fmt(ratio['p50_latency'], 2)}, "
              f"req/s × {fmt(ratio['requests_per_s'], 2)}")
    if "cold_first_request" in report:
        print(f"cold first request: {fmt(report['cold_first_request']['latency_ms']['p50'])} ms")
    print(f"JSON: {json_path}" + ("" if args.no_plot else f"; plot: {png_path}"))
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ------------------------------------------------------------------ compare


def cmd_compare(args: argparse.Namespace) -> int:
    from serve_app.bench.bare import BareSettings
    from serve_app.bench.compare import CompareSettings, compare_tables, plot_compare, run_compare
    from serve_app.bench.loadgen import LoadSettings
    from serve_app.bench.report import write_json

    width, height = _size(args.image_size)
    levels = _ints(args.levels)
    image_batches = _ints(args.bare_image_batches) if args.bare_image_batches else sorted(
        {1, *(b for b in (8, 32) if b <= max(levels)), min(max(levels), 32)})
    text_batches = _ints(args.bare_text_batches) if args.bare_text_batches else sorted({1, min(max(levels), 32)})
    settings = CompareSettings(
        model=args.model, pretrained=_pretrained(args.pretrained), threads=args.threads, levels=levels,
        modalities=_strs(args.modalities), systems=_strs(args.systems), width=width, height=height,
        distinct=args.distinct,
        load=LoadSettings(duration_s=args.duration, warmup_s=args.warmup, max_requests=args.max_requests,
                          timeout_s=args.timeout, progress=not args.no_progress and sys.stderr.isatty()),
        bare=BareSettings(image_batches=image_batches, text_batches=text_batches, min_seconds=args.bare_min_seconds,
                          min_iterations=args.bare_min_iterations, warmup_iterations=args.bare_warmup_iterations,
                          width=width, height=height),
        app_args=json.loads(args.app_args) if args.app_args else {},
        startup_timeout_s=args.startup_timeout, infinity_bin=args.infinity_bin, workdir=args.workdir,
        import_path=args.import_path, pythonpath=args.pythonpath, bare_beside_idle=not args.no_bare_beside_idle,
    )
    result = run_compare(settings)
    result["command"] = " ".join(["clip-bench", *sys.argv[1:]]) if args.argv is None else " ".join(args.argv)
    json_path, png_path = _out_paths(args, "compare")
    write_json(json_path, result)
    tables = compare_tables(result)
    if not args.no_plot:
        plot_compare(result, png_path)
    json_path.with_suffix(".md").write_text(tables + "\n", encoding="utf-8")
    print(tables)
    print(f"JSON: {json_path}; table: {json_path.with_suffix('.md')}" + ("" if args.no_plot else f"; plot: {png_path}"))
    return 0


# ------------------------------------------------------------------ gpu


def cmd_gpu(args: argparse.Namespace) -> int:
    import contextlib
    import tempfile

    from serve_app.bench.gpu import GpuSettings, run_gpu, smoke_settings, summary_table

    # the smoke run's tiny model lives only as long as the run (the test suite runs it every time)
    scratch = tempfile.TemporaryDirectory(prefix="clip-bench-gpu-smoke-") if args.smoke else contextlib.nullcontext()
    if args.smoke:
        settings = smoke_settings(Path(scratch.name))
        settings.served = not args.no_served
        settings.compile = not args.no_compile
        settings.served_import_path = args.served_import_path
    else:
        settings = GpuSettings(
            model=args.model, pretrained=_pretrained(args.pretrained), device=args.device,
            precisions=_strs(args.precisions), batches=_ints(args.batches), compile_batches=_ints(args.compile_batches),
            attention=_strs(args.attention), compile=not args.no_compile, text_batches=_ints(args.text_batches),
            gflop_per_image=args.gflop_per_image, peak_tflops=args.peak_tflops, budget_s=args.budget,
            served=not args.no_served, served_seconds=args.served_seconds,
            served_concurrency=args.served_concurrency, served_images_per_request=args.served_images_per_request,
            served_image_size=_size(args.image_size), served_max_batch_size=args.served_max_batch_size,
            served_preprocessors=args.served_preprocessors, served_ingress=args.served_ingress,
            served_import_path=args.served_import_path,
        )
    json_path = Path(args.out) if args.out else DEFAULT_OUT / f"gpu-{_stamp()}.json"
    with scratch:
        result = run_gpu(settings, json_path)
    table = summary_table(result)
    json_path.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"JSON: {json_path}")
    return 0


# ------------------------------------------------------------------ checkpoint


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """A random-weight `local-dir:` checkpoint of a built-in architecture (real sizes, real load path)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from serve_app.dev_model import write_tiny_model

    model_cfg = open_clip.get_model_config(args.arch)
    if model_cfg is None:
        raise SystemExit(f"unknown open_clip architecture {args.arch!r}")
    preprocess_cfg = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    started = time.perf_counter()
    path = write_tiny_model(args.directory, seed=args.seed, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg)
    print(f"{path} ({args.arch}, random weights) written in {time.perf_counter() - started:.0f}s")
    return 0


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)

    bare = sub.add_parser("bare", help="the model in-process, no server: items/s at several batch sizes")
    _model_args(bare)
    bare.add_argument("--device", default="cpu")
    bare.add_argument("--precision", default="auto")
    bare.add_argument("--cpu-kernels", default="onednn", choices=["onednn", "eager"],
                      help="the service's `cpu_kernels` setting (eager: open_clip's modules as they are)")
    bare.add_argument("--modalities", default="image,text")
    bare.add_argument("--image-batches", default="1,8,32")
    bare.add_argument("--text-batches", default="1,32")
    bare.add_argument("--image-size", default="640x480", help="JPEG size WxH")
    bare.add_argument("--min-seconds", type=float, default=3.0)
    bare.add_argument("--min-iterations", type=int, default=2)
    bare.add_argument("--warmup-iterations", type=int, default=1)
    bare.add_argument("--out", default=None, help="JSON path (default bench-out/bare-<time>.json)")
    bare.set_defaults(func=cmd_bare)

    prep = sub.add_parser("prep", help="preprocessing per core, in-process through the service's own code: images/s "
                          "by size, format and decode path, and the cores one GPU needs")
    prep.add_argument("--model", default="ViT-g-14", help="open_clip id; only its preprocessing config is read "
                      "(a built-in name needs no weights)")
    prep.add_argument("--pretrained", default="", help="pretrained tag whose preprocessing config to use ('' none)")
    prep.add_argument("--sizes", default="640x480,1920x1080,4000x3000", help="WxH,...")
    prep.add_argument("--formats", default="jpeg,png")
    prep.add_argument("--decodes", default="exact,fast", help="image_decode paths (fast changes JPEGs only)")
    prep.add_argument("--threads", default="1", help="decode threads, e.g. 1,2 (one per core)")
    prep.add_argument("--quality", type=int, default=90, help="JPEG quality")
    prep.add_argument("--distinct", type=int, default=2, help="distinct images per size and format")
    prep.add_argument("--min-seconds", type=float, default=2.0, help="per measurement")
    prep.add_argument("--min-images", type=int, default=3, help="per thread and measurement")
    prep.add_argument("--rounds", type=int, default=3, help="every measurement repeated, variants alternating; "
                      "the median is reported")
    prep.add_argument("--encoder-rate", type=float, default=None,
                      help="images/s one GPU encodes (default 1000: an estimate for ViT-g/14 bf16 on an H200; no GPU "
                      "run measured yet)")
    prep.add_argument("--ingress", action="store_true", help="also time the ingress's parse and hand-off per request")
    prep.add_argument("--replicas", default="", help="also measure the preprocessing pool on Ray Serve with these "
                      "replica counts, e.g. 1,2 (JPEG sizes only)")
    prep.add_argument("--replica-cpus", type=float, default=1.0, help="num_cpus of each pool replica (decode threads)")
    prep.add_argument("--out", default=None, help="JSON path (default bench-out/prep-<time>.json)")
    prep.set_defaults(func=cmd_prep, argv=None)

    load = sub.add_parser("load", help="load generator against a running OpenAI-compatible embeddings URL")
    load.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    load.add_argument("--model", default=None, help="the `model` field to send")
    load.add_argument("--payload", default="image", help="image | text | classify")
    load.add_argument("--path", default=None, help="override the endpoint path of the payload kind")
    load.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,8,32)")
    load.add_argument("--rate", default=None, help="comma-separated fixed request rates (req/s) instead")
    load.add_argument("--image-size", default="640x480", help="JPEG size WxH")
    load.add_argument("--items-per-request", type=int, default=1)
    load.add_argument("--distinct", type=int, default=128, help="distinct request bodies cycled through")
    load.add_argument("--labels", type=int, default=1000, help="classify: number of labels")
    load.add_argument("--templates", default="imagenet", help="classify: 'imagenet' or templates joined by '|'")
    load.add_argument("--invalid-every", type=int, default=0, help="every n-th request carries a corrupt item")
    load.add_argument("--compare-to", default=None, help="also run this payload kind (e.g. image) and report ratios")
    load.add_argument("--cold-first", action="store_true", help="time one request alone before the load")
    load.add_argument("--no-plot", action="store_true")
    load.add_argument("--out", default=None, help="JSON path (PNG beside it; default bench-out/load-<time>.json)")
    _load_args(load)
    load.set_defaults(func=cmd_load)

    step = sub.add_parser("step", help="a step load against our service with autoscaling: replicas per pool over "
                          "time, throughput, p50/p99, refusals; JSON and PNG")
    _model_args(step)
    step.set_defaults(threads=1)
    step.add_argument("--payload", default="text", choices=["text", "image"])
    step.add_argument("--items-per-request", type=int, default=1)
    step.add_argument("--steps", default="1:30,16:120,1:120", help="CONCURRENCY:SECONDS,... closed-loop steps")
    step.add_argument("--max-replicas", type=int, default=2, help="the encoder pool's max_replicas")
    step.add_argument("--app-args", default="{}", help="JSON merged over the service's args (pools merge per key)")
    step.add_argument("--workdir", default="/tmp/clip-bench-step")
    step.add_argument("--no-plot", action="store_true")
    step.add_argument("--out", default=None, help="JSON path (PNG beside it; default bench-out/step-<time>.json)")
    step.set_defaults(func=cmd_step)

    soak = sub.add_parser("soak", help="our service under steady load for minutes: every replica's RSS over time, "
                          "errors; JSON")
    _model_args(soak)
    soak.add_argument("--minutes", type=float, default=10.0)
    soak.add_argument("--warmup", type=float, default=60.0, help="seconds of load before memory counts")
    soak.add_argument("--concurrency", type=int, default=2, help="closed-loop clients per modality (image, text)")
    soak.add_argument("--sample-s", type=float, default=15.0, help="seconds between RSS samples")
    _server_run_args(soak, "soak")
    soak.set_defaults(func=cmd_soak)

    cpu = sub.add_parser("cpu", help="the service's CPU per request (every process of it), both layouts side by "
                         "side; JSON")
    cpu.add_argument("--model", default=None, help="open_clip id (default: a tiny random model: the serving path)")
    cpu.add_argument("--pretrained", default=None)
    cpu.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the encoder")
    cpu.add_argument("--layouts", default="pools,one-process")
    cpu.add_argument("--payloads", default="text:1,text:16,image:1,image:8", help="KIND:ITEMS_PER_REQUEST,...")
    cpu.add_argument("--concurrency", type=int, default=32)
    cpu.add_argument("--duration", type=float, default=15.0)
    cpu.add_argument("--warmup", type=float, default=3.0)
    cpu.add_argument("--encoder-rate", type=float, default=10_000.0, help="items/s of one GPU, for cores per GPU")
    cpu.add_argument("--latency", type=float, default=5.0,
                     help="seconds of one client alone per payload after the loaded window (p50 at c=1); 0: none")
    _server_run_args(cpu, "cpu")
    cpu.set_defaults(func=cmd_cpu)

    tenancy = sub.add_parser("tenancy", help="the ingress with tenancy on (Redis, PostgreSQL) against off, side by "
                             "side; JSON")
    tenancy.add_argument("--redis-url", required=True, help="a running Redis (e.g. redis://127.0.0.1:6390/0)")
    tenancy.add_argument("--database-url", required=True,
                         help="a running database, SQLAlchemy async URL (postgresql+asyncpg://...)")
    tenancy.add_argument("--model", default=None, help="open_clip id (default: a tiny random model: the serving path)")
    tenancy.add_argument("--pretrained", default=None)
    tenancy.add_argument("--payloads", default="text:1", help="KIND:ITEMS_PER_REQUEST,...")
    tenancy.add_argument("--concurrency", type=int, default=32)
    tenancy.add_argument("--duration", type=float, default=15.0)
    tenancy.add_argument("--warmup", type=float, default=3.0)
    tenancy.add_argument("--rounds", type=int, default=2, help="windows of each variant, alternating")
    _server_run_args(tenancy, "tenancy")
    tenancy.set_defaults(func=cmd_tenancy)

    calls = sub.add_parser("calls", help="Ray Serve's own CPU per handle call (no work in the replicas), and the "
                           "pixels' hop to the encoder per image, by value and by reference; JSON")
    calls.add_argument("--calls", type=int, default=3000, help="calls per kind")
    calls.add_argument("--concurrency", type=int, default=32)
    calls.add_argument("--text-rows", default="1,16", help="token rows per text call")
    calls.add_argument("--images", default="1,8", help="images per image call (x0 is always measured)")
    calls.add_argument("--image-size", type=int, default=224, help="pixels' side (ViT-B-32 and most CLIPs: 224)")
    calls.add_argument("--out", default=None, help="JSON path (default bench-out/calls-<time>.json)")
    calls.set_defaults(func=cmd_calls)

    hostile = sub.add_parser("hostile", help="the hostile corpus beside good traffic: per class statuses and worst "
                             "time, /livez, every replica's RSS before and after; JSON")
    _model_args(hostile)
    hostile.add_argument("--requests", type=int, default=1000, help="hostile requests after one warm-up round")
    hostile.add_argument("--concurrency", type=int, default=6, help="hostile requests in flight")
    hostile.add_argument("--good-clients", type=int, default=2, help="closed-loop clients of good requests")
    _server_run_args(hostile, "hostile")
    hostile.set_defaults(func=cmd_hostile)

    compare = sub.add_parser("compare", help="bare vs our service vs the naive server vs infinity-emb, one run")
    _model_args(compare)
    compare.add_argument("--levels", default="1,32", help="concurrency levels")
    compare.add_argument("--modalities", default="image,text")
    compare.add_argument("--systems", default="ours,ours-1p,naive,infinity",
                         help="ours-1p: our service in the one-process layout; infinity is skipped when not installed")
    compare.add_argument("--image-size", default="640x480")
    compare.add_argument("--distinct", type=int, default=128)
    compare.add_argument("--bare-image-batches", default=None, help="default: 1, 8 and 32 up to the top level")
    compare.add_argument("--bare-text-batches", default=None, help="default: 1 and min(top level, 32)")
    compare.add_argument("--bare-min-seconds", type=float, default=3.0)
    compare.add_argument("--bare-min-iterations", type=int, default=2)
    compare.add_argument("--bare-warmup-iterations", type=int, default=1)
    compare.add_argument("--app-args", default=None, help="JSON merged over our build_app args, e.g. "
                         "'{\"preprocessor\": {\"num_cpus\": 0.5}}'")
    compare.add_argument("--import-path", default="serve_app.app:build_app",
                         help="our app builder (module:function taking build_app's args), measured the same way")
    compare.add_argument("--pythonpath", default=None, help="prepended to PYTHONPATH of our server")
    compare.add_argument("--startup-timeout", type=float, default=180.0)
    compare.add_argument("--no-bare-beside-idle", action="store_true",
                         help="skip the bare run beside each idle server (its wake-ups' cost to the model)")
    compare.add_argument("--infinity-bin", default="infinity_emb",
                         help="infinity-emb's CLI: a path, or a name looked up on PATH (default: infinity_emb). "
                         "The `python` beside it builds the random-weight HF CLIP it serves, so its environment "
                         "needs transformers (BENCHMARKS.md, \"How to run\"); not found: infinity is skipped")
    compare.add_argument("--workdir", default=None, help="configs, logs, the HF model (default: a temp dir)")
    compare.add_argument("--no-plot", action="store_true")
    compare.add_argument("--out", default=None, help="JSON path (.md table and .png beside it)")
    _load_args(compare)
    compare.set_defaults(func=cmd_compare, argv=None)

    gpu = sub.add_parser("gpu", help="the GPU run (ViT-g/14 random weights) on a GPU machine where the project is "
                         "installed (pip install -e .[bench]); --smoke: tiny model on the CPU")
    gpu.add_argument("--smoke", action="store_true", help="tiny random model on the CPU: tests the whole path")
    gpu.add_argument("--model", default="ViT-g-14")
    gpu.add_argument("--pretrained", default="random")
    gpu.add_argument("--device", default="cuda")
    gpu.add_argument("--precisions", default="bf16,fp16")
    gpu.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    gpu.add_argument("--compile-batches", default="1,2,4,8,16,32,64,128,256")
    gpu.add_argument("--attention", default="sdpa,math", help="sdpa: fused kernels; math: the unfused kernel")
    gpu.add_argument("--no-compile", action="store_true")
    gpu.add_argument("--text-batches", default="256,1024")
    gpu.add_argument("--gflop-per-image", type=float, default=None, help="default 534 for ViT-g-14, else counted")
    gpu.add_argument("--peak-tflops", type=float, default=989.0)
    gpu.add_argument("--budget", type=float, default=420.0, help="seconds; later configurations are skipped")
    gpu.add_argument("--no-served", action="store_true")
    gpu.add_argument("--served-seconds", type=float, default=30.0)
    gpu.add_argument("--served-concurrency", type=int, default=64)
    gpu.add_argument("--served-images-per-request", type=int, default=8)
    gpu.add_argument("--served-max-batch-size", type=int, default=128)
    gpu.add_argument("--served-preprocessors", type=int, default=None)
    gpu.add_argument("--served-ingress", type=int, default=2)
    gpu.add_argument("--served-import-path", default="serve_app.app:build_app",
                     help="the app builder served (module:function taking build_app's args)")
    gpu.add_argument("--image-size", default="640x480")
    gpu.add_argument("--out", default=None, help="JSON path (default bench-out/gpu-<time>.json; .md beside it)")
    gpu.set_defaults(func=cmd_gpu)
    bulk = sub.add_parser("bulk", help="the Batch API against the bare model (images/s, texts/s), the online p99 "
                          "beside a running batch, the batch job's peak RSS by file size; JSON")
    _model_args(bulk)
    bulk.add_argument("--tiny", action="store_true", help="the tiny random model of serve_app.dev_model (a smoke "
                      "run); --model/--pretrained are ignored")
    bulk.add_argument("--images", type=int, default=64, help="throughput: image lines (one 640x480 JPEG each)")
    bulk.add_argument("--texts", type=int, default=512, help="throughput: text lines (one caption each)")
    bulk.add_argument("--lines", default="10000,50000", help="memory: text lines of each file, e.g. 10000,50000")
    bulk.add_argument("--window", type=float, default=20.0, help="priority: seconds of each online window")
    bulk.add_argument("--warmup", type=float, default=2.0, help="priority: load before each window, seconds")
    bulk.add_argument("--concurrency", type=int, default=2, help="priority: closed-loop online clients")
    bulk.add_argument("--rate", type=float, default=None,
                      help="priority: online requests/s, an open loop (a fixed load; instead of --concurrency)")
    bulk.add_argument("--rounds", type=int, default=1, help="priority: rounds of without / with a batch")
    bulk.add_argument("--online-payload", default="image", choices=["image", "text"],
                      help="priority: what one online request carries (one item)")
    bulk.add_argument("--niceness", type=int, default=10, help="the job's stages' OS niceness (0: none)")
    bulk.add_argument("--idle", action="store_true", help="the job's stages under SCHED_IDLE (Linux)")
    bulk.add_argument("--worker-niceness", type=int, default=None,
                      help="RAY_worker_niceness of the server's Ray: the niceness Ray starts every worker at, online "
                      "replicas included (default: Ray's, 15)")
    bulk.add_argument("--preprocess-concurrency", type=int, default=1, help="the job's preprocessing actors")
    bulk.add_argument("--batch-size", type=int, default=32, help="the job's encoder batch, and bare's batch size")
    bulk.add_argument("--encoding-format", default="float", choices=["float", "base64"])
    bulk.add_argument("--image-size", default="640x480", help="JPEG size WxH")
    bulk.add_argument("--parts", default=",".join(("throughput", "priority", "memory")),
                      help="which parts to run: throughput,priority,memory")
    bulk.add_argument("--sample-s", type=float, default=0.2, help="memory: seconds between RSS samples")
    bulk.add_argument("--bare-min-seconds", type=float, default=3.0, help="bare: seconds per modality")
    bulk.add_argument("--priority-max-lines", type=int, default=5000,
                      help="priority: the batch's image lines at most (~55 kB each)")
    bulk.add_argument("--job-timeout", type=float, default=900.0, help="seconds one batch may take")
    _server_run_args(bulk, "bulk")
    bulk.set_defaults(func=cmd_bulk, argv=None)

    checkpoint = sub.add_parser("checkpoint", help="write a random-weight local-dir checkpoint of an architecture")
    checkpoint.add_argument("directory")
    checkpoint.add_argument("--arch", default="ViT-g-14", help="a built-in open_clip architecture")
    checkpoint.add_argument("--seed", type=int, default=0)
    checkpoint.set_defaults(func=cmd_checkpoint)
    return parser


def bulk_settings(args: argparse.Namespace) -> Any:
    from serve_app.bench.bulk import PARTS, BulkSettings

    parts = _strs(args.parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown --parts {unknown}; choose from {', '.join(PARTS)}")
    lines = _ints(args.lines)
    if "memory" in parts and (len(lines) < 1 or min(lines) < 1):
        raise SystemExit("--lines: one or more positive line counts, e.g. 10000,50000")
    width, height = _size(args.image_size)
    return BulkSettings(
        model=None if args.tiny else args.model, pretrained=None if args.tiny else _pretrained(args.pretrained),
        threads=args.threads, images=args.images, texts=args.texts, width=width, height=height, lines=lines,
        window_s=args.window, warmup_s=args.warmup, concurrency=args.concurrency, rate=args.rate, rounds=args.rounds,
        online_payload=args.online_payload,
        niceness=args.niceness, idle=args.idle, worker_niceness=args.worker_niceness,
        preprocess_concurrency=args.preprocess_concurrency, batch_size=args.batch_size,
        encoding_format=args.encoding_format, parts=parts, sample_s=args.sample_s,
        bare_min_seconds=args.bare_min_seconds, job_timeout_s=args.job_timeout,
        priority_max_lines=args.priority_max_lines, app_args=json.loads(args.app_args), workdir=args.workdir,
    )


def cmd_bulk(args: argparse.Namespace) -> int:
    from serve_app.bench.bulk import bulk_table, run_bulk
    from serve_app.bench.report import write_json

    settings = bulk_settings(args)
    report = run_bulk(settings)
    report["command"] = " ".join(args.argv or ["clip-bench", *sys.argv[1:]])
    json_path, _ = _out_paths(args, "bulk")
    write_json(json_path, report)
    print(bulk_table(report))
    print(f"\nmodel {report['model']} ({settings.threads} torch threads); wrote {json_path}")
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from serve_app.bench.report import write_json
    from serve_app.bench.soak import SoakSettings, run_soak, soak_table

    settings = SoakSettings(model=args.model, pretrained=_pretrained(args.pretrained), threads=args.threads,
                            minutes=args.minutes, warmup_s=args.warmup, concurrency=args.concurrency,
                            sample_s=args.sample_s, app_args=json.loads(args.app_args), workdir=args.workdir)
    report = run_soak(settings)
    json_path, _ = _out_paths(args, "soak")
    write_json(json_path, report)
    print(soak_table(report))
    print(f"\nwrote {json_path}")
    errors = sum(load["error_count"] for load in report["load"].values())
    return 0 if errors == 0 else 1


def cmd_tenancy(args: argparse.Namespace) -> int:
    from serve_app.bench.report import write_json
    from serve_app.bench.tenancy import TenancyBenchSettings, run_tenancy, tenancy_table

    payloads = _payload_list(args.payloads)
    settings = TenancyBenchSettings(
        redis_url=args.redis_url, database_url=args.database_url, model=args.model,
        pretrained=_pretrained(args.pretrained) if args.model else None, payloads=payloads,
        concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup, rounds=args.rounds,
        app_args=json.loads(args.app_args), workdir=args.workdir,
    )
    report = run_tenancy(settings)
    json_path, _ = _out_paths(args, "tenancy")
    write_json(json_path, report)
    print(tenancy_table(report))
    print(f"\nwrote {json_path}")
    return 0


def cmd_calls(args: argparse.Namespace) -> int:
    from serve_app.bench.ray_calls import CallsSettings, calls_table, launch

    settings = CallsSettings(calls=args.calls, concurrency=args.concurrency, text_rows=_ints(args.text_rows),
                             images=_ints(args.images), image_size=args.image_size)
    json_path, _ = _out_paths(args, "calls")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    status = launch(settings, json_path)
    if status != 0:
        return status
    print(calls_table(json.loads(json_path.read_text())))
    print(f"\nwrote {json_path}")
    return 0


def cmd_cpu(args: argparse.Namespace) -> int:
    from serve_app.bench.cpu import CpuSettings, cpu_table, run_cpu
    from serve_app.bench.report import write_json

    payloads = _payload_list(args.payloads)
    settings = CpuSettings(model=args.model, pretrained=_pretrained(args.pretrained) if args.model else None,
                           threads=args.threads, layouts=_strs(args.layouts), payloads=payloads,
                           concurrency=args.concurrency, duration_s=args.duration, warmup_s=args.warmup,
                           encoder_rate=args.encoder_rate, latency_s=args.latency,
                           app_args=json.loads(args.app_args), workdir=args.workdir)
    report = run_cpu(settings)
    json_path, _ = _out_paths(args, "cpu")
    write_json(json_path, report)
    print(cpu_table(report))
    print(f"\nwrote {json_path}")
    return 0


def cmd_hostile(args: argparse.Namespace) -> int:
    from serve_app.bench.hostile import HostileSettings, hostile_table, run_hostile
    from serve_app.bench.report import write_json

    settings = HostileSettings(requests=args.requests, concurrency=args.concurrency, good_clients=args.good_clients)
    report = run_hostile(args.model, _pretrained(args.pretrained), args.threads, settings,
                         json.loads(args.app_args), args.workdir)
    json_path, _ = _out_paths(args, "hostile")
    write_json(json_path, report)
    print(hostile_table(report))
    print(f"\nwrote {json_path}")
    unexpected = sum(len(r["unexpected"]) for r in report["classes"].values())
    return 0 if unexpected == 0 and report["good"]["wrong_vectors"] == 0 else 1


def cmd_step(args: argparse.Namespace) -> int:
    from serve_app.bench.report import write_json
    from serve_app.bench.step import StepSettings, plot_step, run_step, step_table

    steps = []
    for part in _strs(args.steps):
        concurrency, _, seconds = part.partition(":")
        steps.append((int(concurrency), float(seconds)))
    settings = StepSettings(model=args.model, pretrained=_pretrained(args.pretrained), threads=args.threads,
                            payload=args.payload, items_per_request=args.items_per_request, steps=steps,
                            max_replicas=args.max_replicas, app_args=json.loads(args.app_args), workdir=args.workdir)
    report = run_step(settings)
    json_path, png_path = _out_paths(args, "step")
    write_json(json_path, report)
    print(step_table(report))
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        print(f"wrote {plot_step(report, png_path)}")
    return 0 if report["scaling"]["failed_requests"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "argv", "missing") is None and argv is not None:
        args.argv = ["clip-bench", *argv]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
