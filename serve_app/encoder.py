"""ClipEncoder deployment (GPU pool, CPU fallback): uint8 pixels and token ids in, unit vectors out.

One replica loads one open_clip model once. Images and texts have separate `@serve.batch` queues; a call
carries a whole request's rows and the queue counts rows (`batch_size_fn`), so batches fill by items, not
by calls. The forward pass runs on one worker thread, off the event loop, under `torch.inference_mode()`.
"""

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve

from serve_app import autoscaling, cpu_kernels, metrics
from serve_app.config import BatchSettings, ModelSpec
from serve_app.errors import InvalidRequest, ServeAppError, Unavailable
from serve_app.modeling import encode_text, load_model, resolve_device, resolve_precision
from serve_app.pass_gate import PassGate

logger = logging.getLogger("ray.serve")

# A replica that fails this many forward passes in a row, with no success between, reports itself
# unhealthy so that Ray Serve replaces it.
MAX_CONSECUTIVE_FAILURES = 3

_BATCHING = BatchSettings()


@dataclass
class _Rows:
    """One call's share of a batch: its rows and when it was enqueued (for the queue-wait metric)."""

    data: torch.Tensor
    enqueued: float
    started: bool = False  # taken into a forward pass: no longer waiting


class QueueDepth:
    """The rows an encoder holds, by modality: waiting (at the gate and in the batch queues) and in the
    running pass, and the size of recent calls. What `record_autoscaling_stats` and the queue-depth gauges
    report."""

    RECENT = 32  # calls that "recent" averages over

    def __init__(self) -> None:
        self.waiting = {"image": 0, "text": 0}
        self.running = {"image": 0, "text": 0}
        self._calls: deque[float] = deque(maxlen=self.RECENT)  # rows / max_batch_size of recent calls

    def arrived(self, modality: str, rows: int, max_rows: int) -> None:
        self.waiting[modality] += rows
        self._calls.append(rows / max_rows)

    def left_unstarted(self, modality: str, rows: int) -> None:
        """A call cancelled (its client went away) before its rows reached a pass."""
        self.waiting[modality] -= rows

    def pass_started(self, modality: str, rows: int) -> None:
        self.waiting[modality] -= rows
        self.running[modality] += rows

    def pass_ended(self, modality: str, rows: int) -> None:
        self.running[modality] -= rows

    def pending_batches(self, max_rows: dict[str, int]) -> float:
        """Full batches' worth of rows waiting or running, each modality at its own batch size."""
        return sum((self.waiting[m] + self.running[m]) / max_rows[m] for m in self.waiting)

    @property
    def batches_per_call(self) -> float:
        return sum(self._calls) / len(self._calls) if self._calls else 1.0


def _count_rows(items: list[_Rows]) -> int:
    return sum(len(item.data) for item in items)


class EncoderCore:
    """The model and its forward passes, usable outside Ray (the benchmark's bare mode uses it too)."""

    def __init__(self, spec: ModelSpec) -> None:
        import open_clip
        from open_clip.model import get_model_preprocess_cfg

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        self.device = resolve_device(spec.device)
        self.precision = resolve_precision(spec.precision, self.device)
        started = time.perf_counter()
        self.model = load_model(spec, self.device, self.precision)
        self.packed_blocks = 0
        if spec.cpu_kernels == "onednn" and self.device == "cpu" and self.precision == "fp32":
            if cpu_kernels.available():
                self.packed_blocks = cpu_kernels.pack_transformer_linears(self.model)
            else:
                logger.warning("cpu_kernels=onednn: this torch build has no oneDNN packed linear; running eager")
        self.load_seconds = time.perf_counter() - started
        self.input_dtype = open_clip.get_input_dtype(self.precision) or torch.float32
        cfg = get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.context_length = int(self.model.context_length)

    @property
    def kernels(self) -> str:
        """What the linear layers run on: `onednn` once blocks were packed, else open_clip's own (`eager`)."""
        return "onednn" if self.packed_blocks else "eager"

    def check_pixels(self, pixels: torch.Tensor) -> None:
        expected = (3, *self.image_size)
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise InvalidRequest(f"pixels must be uint8 (N, {expected}), got {pixels.dtype} {tuple(pixels.shape)}")

    def check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dtype not in (torch.int64, torch.int32) or tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise InvalidRequest(f"tokens must be integer (N, <= {self.context_length}), got {tuple(tokens.shape)}")

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """open_clip's ToTensor + Normalize on the device, then `encode_image(normalize=True)`."""
        x = pixels.to(self.device, non_blocking=True).to(torch.float32).div_(255)
        x = x.sub_(self.mean).div_(self.std).to(self.input_dtype)
        return self.model.encode_image(x, normalize=True).float().cpu().numpy()

    @torch.inference_mode()
    def encode_texts(self, tokens: torch.Tensor) -> np.ndarray:
        return encode_text(self.model, tokens.to(self.device, dtype=torch.long)).float().cpu().numpy()


# Ray options come from the pool settings (serve_app/config.py, POOL_DEFAULTS), applied by build_app.
@serve.deployment
class ClipEncoder:
    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._batching = spec.batching
        # One thread: forward passes of the two queues never compete for the same cores or device.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        # Loading and warm-up run there too, so that all of the model's CPU work has one OpenMP team: libgomp
        # gives each thread that starts a parallel region a team of its own, and once a process holds more
        # OpenMP threads than cores, every team sleeps at its barriers instead of spinning (serve_app/openmp.py).
        self._core = self._worker.submit(EncoderCore, spec).result()
        # Calls wait here while a pass runs, and after it until its callers are back (serve_app/pass_gate.py).
        self._gate = PassGate(self._batching.refill_wait_fraction, self._batching.refill_gap_s,
                              on_refill=lambda outcome, seconds: metrics.observe_refill(spec.name, outcome, seconds))
        self._last_success: float | None = None
        self._consecutive_failures = 0
        self._depth = QueueDepth()
        self._worker.submit(self._warm_up).result()
        logger.info(
            "ClipEncoder %s ready on %s/%s (%s kernels) in %.1fs", spec.name, self._core.device,
            self._core.precision, self._core.kernels, self._core.load_seconds,
        )

    def _warm_up(self) -> None:
        """One real encode of each kind: the replica is only reported ready once the model works."""
        pixels = torch.zeros((1, 3, *self._core.image_size), dtype=torch.uint8)
        tokens = torch.zeros((1, self._core.context_length), dtype=torch.long)
        self._core.encode_images(pixels)
        self._core.encode_texts(tokens)
        self._last_success = time.monotonic()

    def reconfigure(self, user_config: dict) -> None:
        """Batch size and wait timeout change here at run time (Serve `user_config`), without a restart."""
        batching = BatchSettings.model_validate(user_config)
        self._image_batch.set_max_batch_size(batching.max_batch_size)
        self._image_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self._text_batch.set_max_batch_size(batching.text_max_batch_size)
        self._text_batch.set_batch_wait_timeout_s(batching.text_batch_wait_timeout_s)
        self._gate.refill_wait_fraction = batching.refill_wait_fraction
        self._gate.refill_gap_s = batching.refill_gap_s
        self._batching = batching

    # ------------------------------------------------------------------ public methods (via handles)

    async def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) uint8 -> (N, D) float32 unit vectors."""
        self._core.check_pixels(pixels)
        return await self._embed("image", pixels, self._image_batch)

    async def embed_texts(self, tokens: torch.Tensor) -> np.ndarray:
        """(N, context) token ids -> (N, D) float32 unit vectors."""
        self._core.check_tokens(tokens)
        return await self._embed("text", tokens, self._text_batch)

    def logit_scale(self) -> float:
        """The model's learned temperature (log scale), for zero-shot softmax at the ingress."""
        return float(self._core.model.logit_scale.detach().float().cpu().reshape(-1)[0])

    def info(self) -> dict:
        """What this replica runs with; `pid` lets tests and operators tell a reconfigure from a restart."""
        return {
            "model": self._spec.name,
            "pid": os.getpid(),
            "device": self._core.device,
            "precision": self._core.precision,
            "kernels": self._core.kernels,
            "batching": self._batching.model_dump(),
            "gate": {"refill_wait_fraction": self._gate.refill_wait_fraction, "refill_gap_s": self._gate.refill_gap_s},
        }

    async def health(self) -> dict:
        """Age of the last successful encode; probes with a real text encode when it is too old."""
        age = self._age()
        if age is None or age > self._spec.health_max_age_s:
            probe = torch.zeros((1, self._core.context_length), dtype=torch.long)
            try:
                await self.embed_texts(probe)
            except Exception as exc:  # reported, not raised: health says 503 with the reason
                return {"ok": False, "last_encode_age_s": age, "detail": f"probe encode failed: {exc}"}
            age = self._age()
        return {"ok": True, "last_encode_age_s": age}

    def check_health(self) -> None:
        """Ray Serve's replica health check: a replica whose forward passes keep failing is replaced."""
        if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"{self._consecutive_failures} forward passes failed in a row")

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the queue-depth autoscaling policy acts on (serve_app/autoscaling.py); Ray calls it on the
        replica every `metrics_interval_s` when the pool autoscales."""
        return {
            autoscaling.PENDING_BATCHES: self._depth.pending_batches(self._max_rows),
            autoscaling.BATCHES_PER_CALL: self._depth.batches_per_call,
        }

    @property
    def _max_rows(self) -> dict[str, int]:
        return {"image": self._batching.max_batch_size, "text": self._batching.text_max_batch_size}

    # ------------------------------------------------------------------ batching

    def _age(self) -> float | None:
        return None if self._last_success is None else time.monotonic() - self._last_success

    async def _embed(self, modality: str, rows: torch.Tensor, queue) -> np.ndarray:
        enqueued = time.perf_counter()
        max_rows = self._max_rows[modality]
        pieces = [_Rows(rows[i : i + max_rows], enqueued) for i in range(0, len(rows), max_rows)]
        self._depth.arrived(modality, len(rows), max_rows)
        self._report_depth()
        try:
            await self._gate.enter(len(rows))
            results = await asyncio.gather(*(queue(piece) for piece in pieces))
        finally:  # cancelled (the client went away): rows that never reached a pass stop counting, and
            # Ray's batch queue drops the cancelled calls, so they cost no encoder time
            unstarted = sum(len(piece.data) for piece in pieces if not piece.started)
            if unstarted:
                self._depth.left_unstarted(modality, unstarted)
                self._report_depth()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results[0] if len(results) == 1 else np.concatenate(results)

    # Batching defaults live in BatchSettings; `reconfigure` applies the configured ones before any call.
    @serve.batch(max_batch_size=_BATCHING.max_batch_size, batch_wait_timeout_s=_BATCHING.batch_wait_timeout_s,
                 batch_size_fn=_count_rows)
    async def _image_batch(self, items: list[_Rows]) -> list[np.ndarray | ServeAppError]:
        return await self._run_batch("image", items, self._core.encode_images)

    @serve.batch(max_batch_size=_BATCHING.text_max_batch_size,
                 batch_wait_timeout_s=_BATCHING.text_batch_wait_timeout_s, batch_size_fn=_count_rows)
    async def _text_batch(self, items: list[_Rows]) -> list[np.ndarray | ServeAppError]:
        return await self._run_batch("text", items, self._core.encode_texts)

    async def _run_batch(self, modality: str, items: list[_Rows], forward) -> list[np.ndarray | ServeAppError]:
        now = time.perf_counter()
        max_rows = self._max_rows[modality]
        for item in items:
            item.started = True
            metrics.observe_queue_wait(self._spec.name, modality, now - item.enqueued)
        rows = _count_rows(items)
        self._depth.pass_started(modality, rows)
        self._report_depth()
        self._gate.pass_started()
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._worker, self._forward_isolated, items, forward)
        finally:
            seconds = time.perf_counter() - now
            self._gate.pass_ended(rows, seconds, max_rows)
            self._depth.pass_ended(modality, rows)
            self._report_depth()
        metrics.observe_batch(self._spec.name, modality, rows, seconds, rows / max_rows)
        return results

    def _report_depth(self) -> None:
        metrics.set_encoder_depth(self._spec.name, sum(self._depth.waiting.values()), sum(self._depth.running.values()))

    def _forward_isolated(self, items: list[_Rows], forward) -> list[np.ndarray | ServeAppError]:
        """One forward pass for the whole batch; if it fails, each call alone, so one bad call fails alone."""
        if len(items) > 1:
            try:
                out = forward(self._pad_and_cat([item.data for item in items]))
                self._record(success=True)
                return list(np.split(out, np.cumsum([len(item.data) for item in items])[:-1]))
            except Exception:
                logger.warning("a batch of %d calls failed; retrying each call alone", len(items))
        return [self._single(item, forward) for item in items]

    def _single(self, item: _Rows, forward) -> np.ndarray | ServeAppError:
        try:
            out = forward(item.data)
        except Exception:
            logger.exception("forward pass failed for %d rows", len(item.data))
            self._record(success=False)
            return Unavailable("the encoder failed on this request; retry it")
        self._record(success=True)
        return out

    @staticmethod
    def _pad_and_cat(parts: list[torch.Tensor]) -> torch.Tensor:
        """Concatenates rows; token tensors of different widths are right-padded with 0 (open_clip's pad)."""
        width = max(p.shape[1] for p in parts)
        if parts[0].ndim == 2 and any(p.shape[1] != width for p in parts):
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
        return torch.cat(parts)

    def _record(self, success: bool) -> None:
        if success:
            self._last_success = time.monotonic()
            self._consecutive_failures = 0
        else:
            self._consecutive_failures += 1
