"""Preprocessor deployment (CPU pool): image bytes -> uint8 pixels, text -> token ids.

It holds each served model's open_clip transform and tokenizer, never its weights. The geometric part of
open_clip's eval transform runs here; normalisation runs on the encoder's device (see `ImagePipeline`).
"""

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray import serve

from serve_app import metrics
from serve_app.config import ImageLimits, ImageURLPolicy, ModelSpec, RequestLimits
from serve_app.errors import InvalidRequest, ModelNotFound
from serve_app.fetch import Budget, ImageFetcher
from serve_app.imaging import (
    check_request_pixels,
    decode_base64,
    load_image,
    probe_image,
)
from serve_app.inputs import is_url
from serve_app import loop_lag
from serve_app.modeling import (
    ImagePipeline,
    get_tokenizer,
    image_pipeline,
    load_model_config,
)
from serve_app.openmp import keep_torch_serial_on_this_thread
from serve_app.tokenizing import cheap_to_tokenize

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class TokenBatch:
    tokens: torch.Tensor  # (N, context_length) int64, open_clip's padding and truncation
    token_counts: list[int]  # real tokens per text, start/end tokens included (for `usage`)


# Decode threads of a replica whose CPUs are not known (the one-process layout, where the encoder owns the CPUs).
DEFAULT_DECODE_THREADS = 2


def decode_threads(num_cpus: float | None) -> int:
    """One decode thread per CPU of the replica's allotment, rounded up: Pillow releases the GIL while it
    decodes and resizes, so n threads keep n cores busy (BENCHMARKS.md, "Preprocessing per core")."""
    if num_cpus is None:
        return DEFAULT_DECODE_THREADS
    return max(1, math.ceil(num_cpus))


async def all_or_nothing(jobs: list[Any]) -> list[Any]:
    """The results of `jobs` run concurrently; at the first failure the others are cancelled and awaited before
    it is raised (asyncio.gather would leave them running), as they are when the caller is cancelled."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # the first failure by position
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]


def tokenize(tokenizer: Any, texts: list[str]) -> TokenBatch:
    """Token ids as open_clip makes them, with each text's real token count (for `usage`)."""
    tokens = tokenizer(texts)
    counts = (tokens != 0).sum(dim=1).tolist()
    return TokenBatch(tokens=tokens, token_counts=[int(c) for c in counts])


def stack_pixels(pixels: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, H, W) uint8. Stacked by numpy, not torch: a torch copy this size would start an OpenMP team in
    the calling thread (see ClipEncoder.__init__)."""
    return torch.from_numpy(np.stack(pixels))


class ModelPreprocessing:
    """One model's transform and tokenizer, usable outside Ray (the benchmark's bare mode uses it too)."""

    def __init__(self, spec: ModelSpec, limits: ImageLimits) -> None:
        self.config = load_model_config(spec.model, spec.pretrained)
        self.pipeline: ImagePipeline = image_pipeline(self.config)
        self.tokenizer = get_tokenizer(spec.model)
        self.limits = limits
        self.image_decode = spec.image_decode
        # fast: libjpeg decodes JPEGs at a reduced scale, never below twice the model's input on either side
        # (a square request, whatever the input's aspect or its EXIF rotation), then the same exact transform.
        self.draft_size = 2 * max(self.config.image_size) if spec.image_decode == "fast" else None

    def image_to_pixels(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) uint8: open_clip's resize/crop and RGB conversion, before ToTensor/Normalize."""
        rgb = self.pipeline.to_pixels(image)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)

    def probe(self, item: str | bytes, param: str) -> Image.Image:
        """An image from its header alone: base64/data URI or fetched bytes; nothing decoded yet."""
        raw = item if isinstance(item, bytes) else decode_base64(item, param, self.limits)
        return probe_image(raw, param, self.limits)

    def pixels_of(self, image: Image.Image, param: str) -> np.ndarray:
        """A probed image's (3, H, W) uint8 pixels, decoded the way this model's `image_decode` says. The full-size
        decode (and a decoder's own canvas) is freed as soon as the pixels exist, not when the request ends:
        otherwise every image of a request, and of every request in flight, would hold its full size at once."""
        decoded = load_image(image, param, self.draft_size)
        try:
            return self.image_to_pixels(decoded)
        finally:
            decoded.close()
            image.close()

    def decode(self, item: str | bytes, param: str) -> Image.Image:
        """The image an item holds, decoded the way this model's `image_decode` says."""
        return load_image(self.probe(item, param), param, self.draft_size)

    def pixels(self, item: str | bytes, param: str) -> np.ndarray:
        """One image's (3, H, W) uint8 pixels; raises naming it (`param`)."""
        return self.pixels_of(self.probe(item, param), param)

    def images(self, data: list[str | bytes], params: list[str]) -> torch.Tensor:
        """(N, 3, H, W) uint8 pixels, one image after another; raises naming the first bad image. Every header
        is read before any image is decoded."""
        probed = [self.probe(d, p) for d, p in zip(data, params)]
        return stack_pixels([self.pixels_of(image, p) for image, p in zip(probed, params)])

    def texts(self, texts: list[str]) -> TokenBatch:
        return tokenize(self.tokenizer, texts)


# Ray options come from the pool settings (serve_app/config.py, POOL_DEFAULTS), applied by build_app.
@serve.deployment
class Preprocessor:
    def __init__(
        self, models: list[ModelSpec], limits: ImageLimits, request_limits: RequestLimits | None = None,
        url_policy: ImageURLPolicy = "off", num_cpus: float | None = None,
    ) -> None:
        """`num_cpus`: the replica's CPU allotment (the pool's `num_cpus`), one decode thread per CPU."""
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # Pillow's own guard agrees with ours
        self._limits = request_limits or RequestLimits()
        self._fetcher = ImageFetcher(url_policy, self._limits, limits.max_image_bytes)
        self._fetch_slots = asyncio.Semaphore(self._limits.url_fetches_per_replica)
        torch.set_num_threads(1)
        self._models = {spec.name: ModelPreprocessing(spec, limits) for spec in models}
        # Decoding releases the GIL in Pillow; the pool keeps the event loop free for new requests and runs a
        # request's images side by side. Its threads, and the event loop's (tokenizing), never start OpenMP
        # teams of their own (serve_app/openmp.py).
        self.threads = decode_threads(num_cpus)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode",
                                        initializer=keep_torch_serial_on_this_thread)

    def loop_lag(self, reset: bool = False) -> dict[str, float]:
        """The worst lag of this replica's event loop since it started (or the last reset)."""
        return loop_lag.REPLICA_LOOP.report(reset)

    def _model(self, name: str) -> ModelPreprocessing:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} is not served here", param="model") from None

    async def images(self, model: str, data: list[str], params: list[str], share: float = 1.0) -> torch.Tensor:
        """`share`: the part of the request's images in this call (a request of more than `CHUNK` inputs
        comes in several calls), which gets that part of the request's pixel and fetched-byte budgets."""
        if len(data) != len(params):
            raise InvalidRequest("internal: data and params differ in length")
        loop_lag.REPLICA_LOOP.ensure_started()
        preprocessing = self._model(model)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        items = await self._fetch_urls(data, params, share)
        # Every header first, so the request's pixel budget is checked before any decoding; then one job per
        # image, so that a request with several images uses every decode thread.
        probed = await self._each(preprocessing.probe, items, params)
        check_request_pixels(probed, params, int(self._limits.max_request_image_pixels * share))
        decoded = await self._each(preprocessing.pixels_of, probed, params)
        pixels = await loop.run_in_executor(self._pool, stack_pixels, decoded)  # 1,024 images: 150 MB to copy
        metrics.observe_preprocess("image", time.perf_counter() - start)
        return pixels

    async def _each(self, work: Any, items: list[Any], params: list[str]) -> list[Any]:
        """`work(item, param)` for every item in the decode threads; raises the first failure by position,
        not the first to fail in time."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self._pool, work, item, param) for item, param in zip(items, params)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _fetch_urls(self, data: list[str], params: list[str], share: float) -> list[str | bytes]:
        """URLs fetched concurrently (under the policy), everything else as it came."""
        urls = [i for i, d in enumerate(data) if is_url(d)]
        if not urls:
            return list(data)
        fetched_at = set(urls)
        inline = sum(len(d) * 3 // 4 for i, d in enumerate(data) if i not in fetched_at)
        budget = Budget(int(self._limits.max_request_image_bytes * share) - inline, params[0].split("[", 1)[0])
        per_request = asyncio.Semaphore(self._limits.url_fetches_per_request)

        async def fetch(i: int) -> bytes:
            async with per_request, self._fetch_slots:
                return await self._fetcher.fetch(data[i], params[i], budget)

        fetched = await all_or_nothing([fetch(i) for i in urls])
        items: list[str | bytes] = list(data)
        for i, raw in zip(urls, fetched):
            if not raw:
                raise InvalidRequest("image URL returned an empty body", param=params[i])
            items[i] = raw
        return items

    async def texts(self, model: str, texts: list[str]) -> TokenBatch:
        keep_torch_serial_on_this_thread()  # a long list's token tensor is big enough for a parallel fill
        loop_lag.REPLICA_LOOP.ensure_started()
        preprocessing = self._model(model)
        start = time.perf_counter()
        if cheap_to_tokenize(texts):
            batch = preprocessing.texts(texts)  # microseconds per text: not worth a thread hop
        else:  # cleaning costs per character and per line: keep the event loop answering meanwhile
            batch = await asyncio.get_running_loop().run_in_executor(self._pool, preprocessing.texts, texts)
        metrics.observe_preprocess("text", time.perf_counter() - start)
        return batch
