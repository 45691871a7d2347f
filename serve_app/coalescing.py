"""Concurrent requests' rows for one model's encoder, sent in fewer calls (issue 25, item 3).

Every handle call between pools costs CPU in the caller, in Ray's router and in the callee whatever its size,
so under load the number of calls, not the model, would set the cores a GPU needs. A `Coalescer` sits in the
ingress, one per model and modality:

- while fewer than `max_in_flight` of its calls are in flight, a request's rows go at once (a lone client
  waits for nothing);
- otherwise they wait, and every request that arrives meanwhile goes with them in the next call, sent when
  one of those in flight returns, up to `max_rows` rows a call;
- rows worth a full call never wait: a backlog reaches the encoder, where its queue depth drives autoscaling
  and every replica can take a share.

Each request gets back exactly its rows, in order. A request cancelled (its client gone) while its rows wait
is removed before they are sent; a call all of whose requests are gone is cancelled, so that the encoder drops
rows it has not started. When a call of several requests fails for a reason that may be one request's (any
error but a refusal by the pool, in which no request's rows were looked at), each request is sent again alone:
one bad request fails alone, as in the encoder's own batches (`ClipEncoder._forward_isolated`).
"""

import asyncio
from collections import deque
from typing import Any, Awaitable, Callable

import numpy as np
import torch

from serve_app.openmp import keep_torch_serial_on_this_thread


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts' rows in order; token tensors of different widths right-padded with 0 (open_clip's pad)."""
    if len(parts) == 1:
        return parts[0]
    keep_torch_serial_on_this_thread()  # the event loop's thread starts no OpenMP team of its own
    width = max(p.shape[1] for p in parts)
    if parts[0].ndim == 2 and any(p.shape[1] != width for p in parts):
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
    return torch.cat(parts)


class _Request:
    __slots__ = ("rows", "future", "call")

    def __init__(self, rows: Any, future: asyncio.Future) -> None:
        self.rows = rows
        self.future = future
        self.call: _Call | None = None  # the call carrying its rows, once sent

    @property
    def gone(self) -> bool:
        """Its caller stopped waiting (cancelled); an answered request is not gone."""
        return self.future.cancelled()


class _Call:
    __slots__ = ("requests", "task")

    def __init__(self, requests: list[_Request]) -> None:
        self.requests = requests
        self.task: asyncio.Task | None = None


class Coalescer:
    """`await coalescer(rows)`: the vectors of `rows` (N, ...), computed by `send` together with other callers'
    rows. One per event loop; not thread-safe."""

    def __init__(
        self, send: Callable[[Any], Awaitable[np.ndarray]], max_in_flight: int, max_rows: int,
        shared_failure: Callable[[BaseException], bool] = lambda exc: False,
        merge: Callable[[list[Any]], Any] = concat_rows,
    ) -> None:
        """`max_in_flight` 0: every request is its own call, as if there were no coalescer. `shared_failure`:
        errors that say nothing about the rows (a refusal by the pool): every request of the call gets them."""
        self._send = send
        self.max_in_flight = max_in_flight
        self.max_rows = max(1, max_rows)
        self._shared_failure = shared_failure
        self._merge = merge
        self._waiting: deque[_Request] = deque()
        self._waiting_rows = 0
        self._in_flight = 0
        self.calls = 0  # calls sent, retries alone included (tests, benchmarks)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests whose rows wait for a call."""
        return len(self._waiting)

    async def __call__(self, rows: Any) -> np.ndarray:
        if self.max_in_flight <= 0:
            self.calls += 1
            return await self._send(rows)
        request = _Request(rows, asyncio.get_running_loop().create_future())
        self._waiting.append(request)
        self._waiting_rows += len(rows)
        self._dispatch()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._leave(request)
            raise

    def _dispatch(self) -> None:
        """Sends what waits while a call may go: one is free, or a full call's rows wait."""
        while self._waiting and (self._in_flight < self.max_in_flight or self._waiting_rows >= self.max_rows):
            requests, rows = [], 0
            while self._waiting and (not requests or rows + len(self._waiting[0].rows) <= self.max_rows):
                request = self._waiting.popleft()
                requests.append(request)
                rows += len(request.rows)
            self._waiting_rows -= rows
            self._in_flight += 1
            call = _Call(requests)
            for request in requests:
                request.call = call
            call.task = asyncio.ensure_future(self._call(call))

    def _leave(self, request: _Request) -> None:
        """A cancelled request: out of the queue if its rows wait; its call cancelled if nobody else is in it."""
        if request.call is None:
            self._waiting.remove(request)
            self._waiting_rows -= len(request.rows)
            return
        task = request.call.task
        if task is not None and not task.done() and all(r.gone for r in request.call.requests):
            task.cancel()

    async def _call(self, call: _Call) -> None:
        try:
            # requests cancelled since the call was formed are not sent
            requests = [r for r in call.requests if not r.gone]
            if requests:
                await self._answer(requests)
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _answer(self, requests: list[_Request]) -> None:
        self.calls += 1
        try:
            out = await self._send(self._merge([r.rows for r in requests]))
        except asyncio.CancelledError:
            for request in requests:
                request.future.cancel()
            raise
        except Exception as exc:
            if len(requests) > 1 and not self._shared_failure(exc):
                await self._each_alone(requests)
                return
            for request in requests:
                _settle(request, exc)
            return
        start = 0
        for request in requests:
            end = start + len(request.rows)
            _settle(request, out[start:end])
            start = end

    async def _each_alone(self, requests: list[_Request]) -> None:
        """After a failed call of several requests: each still waiting is sent again alone (the call keeps its
        place in flight meanwhile)."""
        live = [r for r in requests if not r.future.done()]
        self.calls += len(live)
        results = await asyncio.gather(*(self._send(r.rows) for r in live), return_exceptions=True)
        for request, result in zip(live, results):
            _settle(request, result)


def _settle(request: _Request, result: Any) -> None:
    if request.future.done():  # cancelled: its caller is gone
        return
    if isinstance(result, BaseException):
        request.future.set_exception(result)
    else:
        request.future.set_result(result)
