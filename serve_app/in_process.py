"""The one-process layout: the preprocessor and the encoders as plain objects inside the ingress replica.

On a CPU-only box with few cores, every Ray hop costs CPU the model needs and every extra Ray worker adds
wake-ups that preempt its threads (BENCHMARKS.md, "One process (`layout: one-process`)"). Here the same classes as the pools' run
in the ingress's process, behind an object with a DeploymentHandle's `.method.remote(...)` shape, so the
service code (`ClipService`) does not know which layout it runs in.
"""

import asyncio
import inspect
from typing import Any

import torch

from serve_app.config import ImageLimits, ImageURLPolicy, ModelSpec, RequestLimits
from serve_app.encoder import ClipEncoder
from serve_app.preprocess import Preprocessor


class _InProcessMethod:
    def __init__(self, method: Any) -> None:
        self._method = method

    def remote(self, *args: Any) -> asyncio.Future:
        """Starts the call at once, like a handle; awaiting the result is the caller's business."""
        return asyncio.ensure_future(self._call(*args))

    async def _call(self, *args: Any) -> Any:
        # A handle lets a pending response be passed on as an argument (pixels from the preprocessor go
        # straight to the encoder); here that is a pending future, awaited first.
        args = tuple([await a if isinstance(a, asyncio.Future) else a for a in args])
        result = self._method(*args)
        return await result if inspect.isawaitable(result) else result


class InProcessHandle:
    """A deployment's instance behind the `.method.remote(...)` calls of a DeploymentHandle."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __getattr__(self, name: str) -> _InProcessMethod:
        return _InProcessMethod(getattr(self.target, name))


def in_process_pools(
    specs: list[ModelSpec], limits: ImageLimits, request_limits: RequestLimits | None = None,
    url_policy: ImageURLPolicy = "off",
) -> tuple[InProcessHandle, dict[str, InProcessHandle]]:
    """The Preprocessor and one ClipEncoder per model, built in this process (each model loaded once)."""
    # The Preprocessor keeps torch to one thread for its own replica; here that would starve the encoder.
    threads = torch.get_num_threads()
    preprocessor = Preprocessor.func_or_class(specs, limits, request_limits, url_policy)
    torch.set_num_threads(threads)
    encoders = {}
    for spec in specs:
        encoder = ClipEncoder.func_or_class(spec)
        encoder.reconfigure(spec.batching.model_dump())
        encoders[spec.name] = InProcessHandle(encoder)
    return InProcessHandle(preprocessor), encoders
