"""Preprocessor deployment (CPU pool): image bytes -> uint8 pixels, text -> token ids.

It holds each served model's open_clip transform and tokenizer, never its weights. The geometric part of
open_clip's eval transform runs here; normalisation runs on the encoder's device (see `ImagePipeline`).
"""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from ray import serve

from serve_app import metrics
from serve_app.config import ImageLimits, ImageURLPolicy, ModelSpec, RequestLimits
from serve_app.errors import InvalidRequest, ModelNotFound
from serve_app.fetch import Budget, ImageFetcher
from serve_app.imaging import check_request_pixels, decode_base64, load_image, probe_image
from serve_app.modeling import ImagePipeline, get_tokenizer, image_pipeline, load_model_config
from serve_app.openmp import keep_torch_serial_on_this_thread

logger = logging.getLogger("ray.serve")

# Texts of more characters than this together are tokenized in the decode threads, not on the event loop.
TEXT_CHARS_INLINE = 8192


@dataclass(frozen=True)
class TokenBatch:
    tokens: torch.Tensor  # (N, context_length) int64, open_clip's padding and truncation
    token_counts: list[int]  # real tokens per text, start/end tokens included (for `usage`)


class ModelPreprocessing:
    """One model's transform and tokenizer, usable outside Ray (the benchmark's bare mode uses it too)."""

    def __init__(self, spec: ModelSpec, limits: ImageLimits) -> None:
        self.config = load_model_config(spec.model, spec.pretrained)
        self.pipeline: ImagePipeline = image_pipeline(self.config)
        self.tokenizer = get_tokenizer(spec.model)
        self.limits = limits

    def image_to_pixels(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) uint8: open_clip's resize/crop and RGB conversion, before ToTensor/Normalize."""
        rgb = self.pipeline.to_pixels(image)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)

    def images(self, data: list[str | bytes], params: list[str], pixel_budget: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) uint8 pixels; raises naming the first bad image. `data` items are base64/data URIs
        or fetched bytes. Every header is read and the request's pixel budget checked before any image is
        decoded. Stacked by numpy, not torch: a torch copy this size would start an OpenMP team in the
        decoding thread (see ClipEncoder.__init__)."""
        probed = [
            probe_image(d if isinstance(d, bytes) else decode_base64(d, p, self.limits), p, self.limits)
            for d, p in zip(data, params)
        ]
        if pixel_budget is not None:
            check_request_pixels(probed, params, pixel_budget)
        pixels = [self.image_to_pixels(load_image(image, p)) for image, p in zip(probed, params)]
        return torch.from_numpy(np.stack(pixels))

    def texts(self, texts: list[str]) -> TokenBatch:
        tokens = self.tokenizer(texts)
        counts = (tokens != 0).sum(dim=1).tolist()
        return TokenBatch(tokens=tokens, token_counts=[int(c) for c in counts])


# Ray options come from the pool settings (serve_app/config.py, POOL_DEFAULTS), applied by build_app.
@serve.deployment
class Preprocessor:
    def __init__(
        self, models: list[ModelSpec], limits: ImageLimits, request_limits: RequestLimits | None = None,
        url_policy: ImageURLPolicy = "off",
    ) -> None:
        Image.MAX_IMAGE_PIXELS = limits.max_image_pixels  # Pillow's own guard agrees with ours
        self._limits = request_limits or RequestLimits()
        self._fetcher = ImageFetcher(url_policy, self._limits, limits.max_image_bytes)
        torch.set_num_threads(1)
        self._models = {spec.name: ModelPreprocessing(spec, limits) for spec in models}
        # Decoding releases the GIL in Pillow; a small pool keeps the event loop free for new requests. Its
        # threads, and the event loop's (tokenizing), never start OpenMP teams of their own (serve_app/openmp.py).
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode",
                                        initializer=keep_torch_serial_on_this_thread)

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
        preprocessing = self._model(model)
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        items = await self._fetch_urls(data, params, share)
        pixel_budget = int(self._limits.max_request_image_pixels * share)
        pixels = await loop.run_in_executor(self._pool, preprocessing.images, items, params, pixel_budget)
        metrics.observe_preprocess("image", time.perf_counter() - start)
        return pixels

    async def _fetch_urls(self, data: list[str], params: list[str], share: float) -> list[str | bytes]:
        """URLs fetched concurrently (under the policy), everything else as it came."""
        urls = [i for i, d in enumerate(data) if d[:8].lower().startswith(("http://", "https://"))]
        if not urls:
            return list(data)
        fetched_at = set(urls)
        inline = sum(len(d) * 3 // 4 for i, d in enumerate(data) if i not in fetched_at)
        budget = Budget(int(self._limits.max_request_image_bytes * share) - inline, params[0].split("[", 1)[0])
        fetched = await asyncio.gather(*(self._fetcher.fetch(data[i], params[i], budget) for i in urls))
        items: list[str | bytes] = list(data)
        for i, raw in zip(urls, fetched):
            if not raw:
                raise InvalidRequest("image URL returned an empty body", param=params[i])
            items[i] = raw
        return items

    async def texts(self, model: str, texts: list[str]) -> TokenBatch:
        keep_torch_serial_on_this_thread()  # a long list's token tensor is big enough for a parallel fill
        preprocessing = self._model(model)
        start = time.perf_counter()
        if sum(map(len, texts)) <= TEXT_CHARS_INLINE:
            batch = preprocessing.texts(texts)  # microseconds per text: not worth a thread hop
        else:  # long words cost open_clip's BPE quadratic time: keep the event loop answering meanwhile
            batch = await asyncio.get_running_loop().run_in_executor(self._pool, preprocessing.texts, texts)
        metrics.observe_preprocess("text", time.perf_counter() - start)
        return batch
