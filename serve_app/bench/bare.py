"""Bare mode: the model in-process, no server; the reference every served number is a ratio of.

Images: JPEG data URI -> decode + open_clip preprocessing (the service's own `ModelPreprocessing`) -> batched
`EncoderCore.encode_images`; texts: tokenizer -> batched `EncoderCore.encode_texts`. The same code and
thread count as the served encoder, with nothing between the steps: what the hardware gives this model.
"""

import time
from dataclasses import dataclass, field
from typing import Any

from serve_app.bench.payloads import jpeg_data_uri, short_texts, synthetic_jpeg
from serve_app.bench.report import latency_summary, loadavg, machine_info


@dataclass
class BareSettings:
    image_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    text_batches: list[int] = field(default_factory=lambda: [1, 32])
    min_seconds: float = 3.0  # per batch size, after warm-up
    min_iterations: int = 2
    max_iterations: int = 1000
    warmup_iterations: int = 1
    width: int = 640
    height: int = 480
    jpeg_quality: int = 85
    distinct: int = 64  # distinct images/texts cycled through


def model_spec(
    model: str, pretrained: str | None = None, threads: int | None = None, device: str = "cpu",
    precision: str = "auto", cpu_kernels: str = "onednn",
) -> Any:
    from serve_app.config import ModelSpec

    return ModelSpec(
        model=model, pretrained=pretrained, torch_threads=threads, device=device, precision=precision,  # type: ignore[arg-type]
        cpu_kernels=cpu_kernels,  # type: ignore[arg-type]
    )


class BareModel:
    """Preprocessing + encoder loaded once; `measure_*` time one batch size each."""

    def __init__(self, spec: Any, settings: BareSettings | None = None) -> None:
        from serve_app.config import ImageLimits
        from serve_app.encoder import EncoderCore
        from serve_app.preprocess import ModelPreprocessing

        self.spec = spec
        self.settings = settings or BareSettings()
        started = time.perf_counter()
        self.preprocessing = ModelPreprocessing(spec, ImageLimits())
        self.core = EncoderCore(spec)
        self.load_seconds = time.perf_counter() - started
        s = self.settings
        self.images = [
            jpeg_data_uri(synthetic_jpeg(s.width, s.height, seed=10_000 + i, quality=s.jpeg_quality))
            for i in range(s.distinct)
        ]
        self.texts = short_texts(s.distinct, seed=1)

    def _cycle(self, pool: list[str], start: int, count: int) -> list[str]:
        return [pool[(start + i) % len(pool)] for i in range(count)]

    def _image_step(self, batch: list[str]) -> None:
        pixels = self.preprocessing.images(batch, [f"input[{i}]" for i in range(len(batch))])
        self.core.encode_images(pixels)

    def _text_step(self, batch: list[str]) -> None:
        self.core.encode_texts(self.preprocessing.texts(batch).tokens)

    def _measure(self, modality: str, batch_size: int) -> dict[str, Any]:
        s = self.settings
        pool, step = (self.images, self._image_step) if modality == "image" else (self.texts, self._text_step)
        cursor = 0
        for _ in range(s.warmup_iterations):
            step(self._cycle(pool, cursor, batch_size))
            cursor += batch_size
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < s.max_iterations and (
            len(times) < s.min_iterations or time.perf_counter() - started < s.min_seconds
        ):
            batch = self._cycle(pool, cursor, batch_size)
            cursor += batch_size
            t0 = time.perf_counter()
            step(batch)
            times.append(time.perf_counter() - t0)
        total = sum(times)
        return {
            "modality": modality,
            "batch": batch_size,
            "iterations": len(times),
            "items_per_s": batch_size * len(times) / total,
            "batch_latency_ms": latency_summary(times),
        }

    def measure_images(self, batch_size: int) -> dict[str, Any]:
        return self._measure("image", batch_size)

    def measure_texts(self, batch_size: int) -> dict[str, Any]:
        return self._measure("text", batch_size)

    def run(self, modalities: tuple[str, ...] = ("image", "text")) -> dict[str, Any]:
        """Every configured batch size of every modality; one JSON-ready dict."""
        load_before = loadavg()
        started = time.perf_counter()
        results: list[dict[str, Any]] = []
        if "image" in modalities:
            results += [self.measure_images(b) for b in self.settings.image_batches]
        if "text" in modalities:
            results += [self.measure_texts(b) for b in self.settings.text_batches]
        return {
            "model": self.spec.model,
            "pretrained": self.spec.pretrained,
            "device": self.core.device,
            "precision": self.core.precision,
            "kernels": self.core.kernels,
            "threads": _threads(),
            "load_seconds": round(self.load_seconds, 2),
            "seconds": round(time.perf_counter() - started, 2),
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "results": results,
        }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def reference(bare: dict[str, Any], modality: str, concurrency: int) -> float | None:
    """The bare rate a server at this concurrency can at best reach: the best batch size <= concurrency."""
    rates = [r["items_per_s"] for r in bare["results"] if r["modality"] == modality and r["batch"] <= concurrency]
    return max(rates) if rates else None


def single_latency_ms(bare: dict[str, Any], modality: str) -> float | None:
    """p50 of one item end to end at batch 1 (decode + preprocess + encode for images)."""
    for r in bare["results"]:
        if r["modality"] == modality and r["batch"] == 1:
            return r["batch_latency_ms"]["p50"]
    return None


def bare_report(bare: dict[str, Any], settings: BareSettings) -> dict[str, Any]:
    from dataclasses import asdict

    return {"tool": "clip-bench bare", "settings": asdict(settings), "machine": machine_info(), **bare}
