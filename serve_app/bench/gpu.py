"""`gpu`: the GPU run. ViT-g/14 with random weights: bare images/s over a batch sweep in bf16/fp16,
eager and `torch.compile`d, with fused SDPA attention and with the math kernel only; TFLOP/s and MFU; text
prompts/s; and the served throughput through a local Ray Serve (our `build_app`) on the same machine.

Everything is bounded by `--budget-s`: configurations run in priority order and the rest are recorded as
skipped once the budget is spent; the JSON is rewritten after every measurement, so a run cut short still
leaves its numbers. The bare part needs only torch and open_clip; the served part is skipped, with the
reason, where Ray Serve or the service cannot be imported.

    pip install -e ".[bench]"                                # on the GPU machine, from the repo root
    clip-bench gpu --out bench-out/gpu.json
    clip-bench gpu --smoke --out bench-out/gpu-smoke.json    # anywhere: tiny model on the CPU, seconds

FLOPs: ViT-g/14's image tower costs 534 GFLOP per 224 px image (open_clip's profile: 267 GMACs); MFU is
achieved TFLOP/s over the dense bf16 peak (989 TFLOP/s, H100/H200 SXM). For any other model the FLOPs are
counted with `torch.utils.flop_counter` on one image.
"""

import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

VIT_G_GFLOP_PER_IMAGE = 534.0
H200_DENSE_BF16_TFLOPS = 989.0


@dataclass
class GpuSettings:
    model: str = "ViT-g-14"
    pretrained: str | None = "random"
    device: str = "cuda"
    precisions: list[str] = field(default_factory=lambda: ["bf16", "fp16"])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    # torch.compile specialises on the first batch size and recompiles once with a dynamic batch dimension at
    # the second; later sizes reuse that graph (so the sweep costs two compiles, not one per size)
    compile_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    attention: list[str] = field(default_factory=lambda: ["sdpa", "math"])
    compile: bool = True
    min_seconds: float = 1.0  # per measurement, after warm-up
    min_iterations: int = 3
    warmup_iterations: int = 2
    text_batches: list[int] = field(default_factory=lambda: [256, 1024])
    gflop_per_image: float | None = None  # None: 534 for ViT-g-14, else counted
    peak_tflops: float = H200_DENSE_BF16_TFLOPS
    budget_s: float = 420.0
    served: bool = True
    served_seconds: float = 30.0
    served_warmup_s: float = 10.0
    served_concurrency: int = 64
    served_images_per_request: int = 8
    served_image_size: tuple[int, int] = (640, 480)
    served_max_batch_size: int = 128
    served_preprocessors: int | None = None  # None: cores - 4, at least 1
    served_ingress: int = 2
    served_import_path: str = "serve_app.app:build_app"  # any `module:builder` taking build_app's args
    threads: int | None = None  # CPU threads for the CPU smoke run


def smoke_settings(workdir: Path) -> GpuSettings:
    """The same code path on a tiny random model on the CPU, in well under a minute."""
    from serve_app.dev_model import write_tiny_model

    model_dir = write_tiny_model(workdir / "tiny-clip")
    return GpuSettings(
        model=f"local-dir:{model_dir}", pretrained=None, device="cpu", precisions=["fp32", "bf16"], batches=[1, 4],
        compile_batches=[4], min_seconds=0.05, min_iterations=2, warmup_iterations=1, text_batches=[8],
        budget_s=240.0, served_seconds=3.0, served_warmup_s=1.0, served_concurrency=4, served_images_per_request=2,
        served_image_size=(96, 64), served_max_batch_size=8, served_preprocessors=1, served_ingress=1, threads=1,
    )


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _attention_context(mode: str) -> Any:
    """'sdpa': PyTorch's fused attention kernels (flash / memory-efficient / cuDNN); 'math': the unfused one."""
    if mode == "sdpa":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _time(fn: Callable[[], Any], settings: GpuSettings, device: str) -> list[float]:
    for _ in range(settings.warmup_iterations):
        fn()
    _sync(device)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < settings.min_iterations or time.perf_counter() - started < settings.min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _load(settings: GpuSettings, precision: str) -> Any:
    import open_clip

    random_weights = settings.pretrained in (None, "random")
    model = open_clip.create_model(
        settings.model, pretrained=None if random_weights else settings.pretrained, precision=precision,
        device=settings.device, require_pretrained=not random_weights,
    )
    return model.eval()


def count_gflop_per_image(model: Any, image_size: tuple[int, int], dtype: Any, device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, 3, *image_size), dtype=dtype, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encode_image(x)
    return counter.get_total_flops() / 1e9


class GpuRun:
    def __init__(self, settings: GpuSettings, out: Path | None) -> None:
        self.settings = settings
        self.out = out
        self.budget = _Budget(settings.budget_s)
        self.result: dict[str, Any] = {
            "tool": "clip-bench gpu", "settings": asdict(settings), "environment": self._environment(),
            "image": [], "text": [], "served": None, "skipped": [], "errors": [],
        }

    def _environment(self) -> dict[str, Any]:
        import torch

        from serve_app.bench.report import machine_info

        env = {"torch": torch.__version__, "machine": machine_info()}
        if self.settings.device.startswith("cuda") and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name()
            env["cuda"] = torch.version.cuda
        try:
            import open_clip

            env["open_clip"] = open_clip.__version__
        except Exception:  # pragma: no cover - reported, not fatal
            pass
        return env

    def save(self) -> None:
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.result, indent=2, default=str) + "\n", encoding="utf-8")

    def _skip(self, what: str, reason: str) -> None:
        self.result["skipped"].append({"what": what, "reason": reason})

    def run(self) -> dict[str, Any]:
        import torch

        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        first = True
        for precision in s.precisions:
            if self.budget.left() <= 0:
                self._skip(f"{precision}: everything", "budget spent")
                continue
            started = time.perf_counter()
            model = _load(s, precision)
            load_s = time.perf_counter() - started
            import open_clip

            dtype = open_clip.get_input_dtype(precision) or torch.float32
            size = model.visual.image_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            gflop = s.gflop_per_image
            if gflop is None:
                gflop = VIT_G_GFLOP_PER_IMAGE if s.model in ("ViT-g-14", "hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K") \
                    else count_gflop_per_image(model, size, dtype, s.device)
            self.result.setdefault("gflop_per_image", gflop)
            self.result.setdefault("load_seconds", {})[precision] = round(load_s, 2)
            # priority within the budget: eager sweeps (sdpa, then math); on the first precision text and the
            # served run; then the compiled sweeps (compiling costs minutes on a large model)
            for attention in s.attention:
                self._image_sweep(model, precision, dtype, size, gflop, False, attention, s.batches)
            if first:
                self._texts(model, precision)
                if s.served:
                    self._served(precision)
            if s.compile:
                for attention in s.attention:
                    self._image_sweep(model, precision, dtype, size, gflop, True, attention, s.compile_batches)
            del model
            if s.device.startswith("cuda"):
                torch.cuda.empty_cache()
            first = False
        self.save()
        return self.result

    def _image_sweep(self, model: Any, precision: str, dtype: Any, size: tuple[int, int], gflop: float,
                     compiled: bool, attention: str, batches: list[int]) -> None:
        import torch

        s = self.settings
        label = f"{precision} {'compiled' if compiled else 'eager'} {attention}"
        forward = model.encode_image
        if compiled:
            torch._dynamo.reset()
            forward = torch.compile(model.encode_image)
        for batch in batches:
            if self.budget.left() <= 0:
                self._skip(f"image {label} batch {batch}", "budget spent")
                continue
            x = torch.randn((batch, 3, *size), device=s.device).to(dtype)
            try:
                with torch.inference_mode(), _attention_context(attention):
                    compile_started = time.perf_counter()
                    forward(x)  # the first call compiles (compiled) or warms kernels up (eager)
                    _sync(s.device)
                    first_call_s = time.perf_counter() - compile_started
                    times = _time(lambda: forward(x), s, s.device)
            except Exception as exc:  # OOM at large batches, a compile failure: recorded, the sweep goes on
                self.result["errors"].append({"what": f"image {label} batch {batch}", "error": f"{type(exc).__name__}: {exc}"[:500]})
                if s.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            mean = sum(times) / len(times)
            images_per_s = batch / mean
            tflops = images_per_s * gflop / 1e3
            self.result["image"].append({
                "precision": precision, "compiled": compiled, "attention": attention, "batch": batch,
                "images_per_s": images_per_s, "batch_ms": mean * 1e3, "first_call_s": round(first_call_s, 3),
                "iterations": len(times), "tflops": tflops, "mfu": tflops / s.peak_tflops,
            })
            print(f"[gpu] image {label} batch {batch}: {images_per_s:.1f} img/s, {tflops:.1f} TFLOP/s, "
                  f"MFU {100 * tflops / s.peak_tflops:.1f}%", flush=True)
            self.save()

    def _texts(self, model: Any, precision: str) -> None:
        import open_clip
        import torch
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        from serve_app.modeling import encode_text

        s = self.settings
        tokenizer = open_clip.get_tokenizer(s.model)
        prompts = [t(c) for c in IMAGENET_CLASSNAMES for t in OPENAI_IMAGENET_TEMPLATES[:8]]
        for batch in s.text_batches:
            if self.budget.left() <= 0:
                self._skip(f"text batch {batch}", "budget spent")
                continue
            tokens = tokenizer(prompts[:batch]).to(s.device)
            with torch.inference_mode():
                times = _time(lambda: encode_text(model, tokens), s, s.device)
            mean = sum(times) / len(times)
            self.result["text"].append({
                "precision": precision, "batch": batch, "prompts_per_s": batch / mean, "batch_ms": mean * 1e3,
                "tokens_in_longest": int((tokens != 0).sum(dim=1).max()),
            })
            print(f"[gpu] text {precision} batch {batch}: {batch / mean:.0f} prompts/s", flush=True)
            self.save()

    def _served(self, precision: str) -> None:
        s = self.settings
        if self.budget.left() < s.served_seconds + s.served_warmup_s + 60:
            self._skip("served", "budget spent")
            return
        try:
            from serve_app.ray_env import use_one_machine_env

            # serve as a GPU box does (deploy/ray-serve.env, without the small-CPU tuning), but stop in
            # seconds (no 30 s drain: it would eat the run's --budget); the caller's own settings win
            use_one_machine_env(small_cpu=False)
            import ray  # noqa: F401
            from ray import serve  # noqa: F401

            _builder(s.served_import_path)
        except Exception as exc:
            self._skip("served", f"Ray Serve or the service cannot be imported here: {type(exc).__name__}: {exc}")
            return
        try:
            self.result["served"] = served_throughput(s, precision)
            print(f"[gpu] served {precision}: {self.result['served']['images_per_s']:.1f} img/s", flush=True)
        except Exception as exc:
            self.result["errors"].append({"what": "served", "error": f"{type(exc).__name__}: {exc}"[:1000]})
        self.save()


def _builder(import_path: str) -> Callable[[Any], Any]:
    import importlib

    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)


def served_throughput(s: GpuSettings, precision: str) -> dict[str, Any]:
    """Starts our app on a local Ray Serve in this process, loads it with JPEGs, shuts it down."""
    import ray
    from ray import serve

    from serve_app.bench.loadgen import Level, LoadSettings, run_load, wait_until_serving
    from serve_app.bench.payloads import ImagePayload
    from serve_app.ray_env import free_port, one_machine_env

    cores = os.cpu_count() or 2
    preprocessors = s.served_preprocessors or max(1, cores - 4)
    port = free_port()
    gpu = s.device.startswith("cuda")
    args = {
        "model": s.model, "served_model_name": "bench", "device": s.device, "precision": precision,
        "max_batch_size": s.served_max_batch_size, "batch_wait_timeout_s": 0.01,
        "encoder": {"num_replicas": 1, "num_cpus": 1 if not gpu else 2, "num_gpus": 1 if gpu else 0,
                    "max_ongoing_requests": 4096},
        "preprocessor": {"num_replicas": preprocessors, "num_cpus": 1 if gpu else 0.25, "max_ongoing_requests": 256},
        "ingress": {"num_replicas": s.served_ingress, "num_cpus": 1 if gpu else 0.25, "max_ongoing_requests": 4096},
    }
    if s.pretrained:
        args["pretrained"] = s.pretrained
    if s.threads:
        args["torch_threads"] = s.threads
    ray.init(address="local", num_cpus=max(cores, 4 + preprocessors + 2 * s.served_ingress),
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        serve.run(_builder(s.served_import_path)(args), name="clip", route_prefix="/", blocking=False)
        width, height = s.served_image_size
        payload = ImagePayload(model="bench", width=width, height=height, items_per_request=s.served_images_per_request,
                               distinct=32).prepare()
        base_url = f"http://127.0.0.1:{port}"
        wait_until_serving(base_url, payload, 600)
        startup_s = time.perf_counter() - started
        load = LoadSettings(duration_s=s.served_seconds, warmup_s=s.served_warmup_s, progress=False)
        level = run_load(base_url, payload, [Level(concurrency=s.served_concurrency)], load)[0]
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "precision": precision, "import_path": s.served_import_path, "app_args": args, "startup_s": round(startup_s, 1),
        "ray_env": {key: os.environ[key] for key in one_machine_env(small_cpu=False) if key in os.environ},
        "image_size": [width, height], **level.to_dict(), "images_per_s": level.items_per_s,
    }


def summary_table(result: dict[str, Any]) -> str:
    from serve_app.bench.report import fmt, format_table

    rows = [[r["precision"], "yes" if r["compiled"] else "no", r["attention"], r["batch"], fmt(r["images_per_s"], 1),
             fmt(r["batch_ms"], 2), f"{r['tflops']:.3g}", f"{100 * r['mfu']:.3g}"] for r in result["image"]]
    out = [format_table(["precision", "compile", "attention", "batch", "images/s", "batch ms", "TFLOP/s", "MFU %"], rows)]
    if result["text"]:
        out += ["", format_table(["precision", "batch", "prompts/s", "batch ms"],
                                 [[t["precision"], t["batch"], fmt(t["prompts_per_s"], 0), fmt(t["batch_ms"], 2)]
                                  for t in result["text"]])]
    served = result.get("served")
    if served:
        eager = [r["images_per_s"] for r in result["image"] if r["precision"] == served["precision"]
                 and not r["compiled"] and r["attention"] == "sdpa"]
        best = max(eager) if eager else None
        out += ["", f"served ({served['precision']}, c={served['concurrency']}, {served['image_size'][0]}x"
                    f"{served['image_size'][1]} JPEGs): {served['images_per_s']:.1f} images/s"
                    + (f" = {served['images_per_s'] / best:.2f} × best eager bare ({best:.1f})" if best else "")
                    + f"; errors {served['errors'] or 0}"]
    for skipped in result["skipped"]:
        out.append(f"skipped: {skipped['what']} ({skipped['reason']})")
    for error in result["errors"]:
        out.append(f"error: {error['what']}: {error['error'][:200]}")
    return "\n".join(out)


def run_gpu(settings: GpuSettings, out: Path | None) -> dict[str, Any]:
    return GpuRun(settings, out).run()
