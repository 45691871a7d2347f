"""EXPERIMENT, not the service: the encoder batching fix proposed by BENCHMARKS.md, measurable side by side.

    clip-bench compare --systems ours --import-path serve_app.bench.experiments.drain_batching:build_app

Ray 2.60's `@serve.batch` forms a batch as soon as `batch_wait_timeout_s` has passed after its first item and
only then waits for the previous batch to finish (`_process_batches` creates the task before the
`max_concurrent_batches` semaphore is taken). While a slow forward pass runs, new requests are therefore cut
into many tiny batches that queue behind it: on a 2-core CPU the encoder ran batches of one at concurrency 32.

This subclass of the service's `ClipEncoder` replaces the two `@serve.batch` queues with a drain-when-free
batcher: one consumer task per modality forms the next batch only when the forward thread is free, from
everything queued by then (up to the row cap); an idle encoder starts a lone request at once, with no wait.
Everything else (forward passes, failure isolation, health) is the service's own code.
"""

import asyncio
import collections
import time
from typing import Any, Callable

import numpy as np

from serve_app.bench.experiments import build_app_with
from serve_app.encoder import ClipEncoder as _ClipEncoderDeployment
from serve_app.encoder import _Rows

_Base: Any = _ClipEncoderDeployment.func_or_class


class _Drain:
    """Pending (rows, future) pairs of one modality and the task that feeds them to the forward thread."""

    def __init__(self) -> None:
        self.pending: collections.deque = collections.deque()
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.sizes: collections.Counter = collections.Counter()


class DrainBatchingEncoder(_Base):
    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._drains: dict[str, _Drain] = {}

    async def embed_images(self, pixels: Any) -> np.ndarray:
        self._core.check_pixels(pixels)
        return await self._submit("image", pixels, lambda: self._batching.max_batch_size, self._core.encode_images)

    async def embed_texts(self, tokens: Any) -> np.ndarray:
        self._core.check_tokens(tokens)
        return await self._submit("text", tokens, lambda: self._batching.text_max_batch_size, self._core.encode_texts)

    def batch_sizes(self) -> dict[str, dict[int, int]]:
        """Rows per forward pass so far, by modality (for checking that batches fill)."""
        return {m: dict(sorted(d.sizes.items())) for m, d in self._drains.items()}

    async def _submit(self, modality: str, rows: Any, max_rows: Callable[[], int], forward: Callable) -> np.ndarray:
        loop = asyncio.get_running_loop()
        drain = self._drains.get(modality)
        if drain is None:
            drain = self._drains[modality] = _Drain()
            drain.task = loop.create_task(self._consume(drain, max_rows, forward))
        cap = max_rows()
        futures = []
        for start in range(0, len(rows), cap):
            future = loop.create_future()
            drain.pending.append((_Rows(rows[start : start + cap], time.perf_counter()), future))
            futures.append(future)
        drain.wakeup.set()
        results = await asyncio.gather(*futures)
        return results[0] if len(results) == 1 else np.concatenate(results)

    async def _consume(self, drain: _Drain, max_rows: Callable[[], int], forward: Callable) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not drain.pending:
                drain.wakeup.clear()
                await drain.wakeup.wait()
            cap = max_rows()
            batch = [drain.pending.popleft()]
            rows = len(batch[0][0].data)
            while drain.pending and rows + len(drain.pending[0][0].data) <= cap:
                item = drain.pending.popleft()
                batch.append(item)
                rows += len(item[0].data)
            drain.sizes[rows] += 1
            try:
                results = await loop.run_in_executor(self._worker, self._forward_isolated, [r for r, _ in batch], forward)
            except Exception as exc:  # never let the consumer die: fail this batch's calls
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def build_app(args: Any) -> Any:
    """The service's own `build_app`, with `DrainBatchingEncoder` in place of `ClipEncoder` (same options)."""
    return build_app_with(args, "ClipEncoder", DrainBatchingEncoder)
