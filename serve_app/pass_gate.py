"""When the calls waiting for an encoder may form its next batch.

Ray 2.60's `@serve.batch` cuts a batch `batch_wait_timeout_s` after its first item even while the previous
batch still runs, so under load a slow forward pass leaves a train of tiny batches behind it. Calls wait at
this gate instead while a pass runs, and enter the batch queue together when it ends.

Letting them in the moment a pass ends is not enough when the clients wait for their answers before sending
again (a batch job with N workers, any closed loop): the clients just answered come back a few ms later,
after the next pass has started with the few stragglers that were waiting. The clients then split into groups
that never merge again: passes of 3, 9 and 20 texts instead of one of 32 on two cores (BENCHMARKS.md,
"Refilling the batch"). So after a pass whose callers outnumber those that arrived during it at least two to
one, the gate stays shut until the callers it answered are back (as many rows as the pass had, plus those
waiting), bounded by a fraction of the pass's own duration and closed early when arrivals pause for
`refill_gap_s`. A steady stream of independent requests arrives during a pass as fast as after it: then the
gate opens at once, and nothing waits longer than before.
"""

import asyncio
import time
from typing import Callable

# How a refill wait ended: every caller back, a full batch waiting, a pause in arrivals, or the deadline.
REFILL_OUTCOMES = ("all_back", "full", "pause", "deadline")


class PassGate:
    """One per encoder replica, on its event loop: `enter` before queueing, `pass_started`/`pass_ended` around
    each forward pass."""

    def __init__(self, refill_wait_fraction: float, refill_gap_s: float,
                 on_refill: Callable[[str, float], None] | None = None) -> None:
        self.refill_wait_fraction = refill_wait_fraction
        self.refill_gap_s = refill_gap_s
        self._on_refill = on_refill  # (outcome, seconds waited): the encoder's metric
        self._open = asyncio.Event()
        self._open.set()
        self._passes_running = 0  # image and text batches share one gate (and one forward thread)
        self._held_rows = 0
        self._last_arrival = 0.0
        self._arrived = asyncio.Event()
        self._refill: asyncio.Task | None = None

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    async def enter(self, rows: int) -> None:
        """Returns when a call with `rows` rows may join the batch queue."""
        if self._open.is_set():
            return
        self._held_rows += rows
        self._last_arrival = time.monotonic()
        self._arrived.set()
        await self._open.wait()

    def pass_started(self) -> None:
        self._passes_running += 1
        self._open.clear()
        if self._refill is not None:
            self._refill.cancel()  # calls already queued started a pass; its end decides again
            self._refill = None

    def pass_ended(self, rows: int, seconds: float, max_rows: int) -> None:
        """After a pass of `rows` rows that took `seconds`; `max_rows` is its queue's batch limit."""
        self._passes_running -= 1
        if self._passes_running:
            return
        held = self._held_rows
        if self.refill_wait_fraction <= 0 or held * 2 >= rows or held >= max_rows:
            self._release()
            return
        ended = time.monotonic()
        self._refill = asyncio.ensure_future(
            self._release_when_refilled(rows + held, max_rows, ended, ended + self.refill_wait_fraction * seconds)
        )

    async def _release_when_refilled(self, expected_rows: int, max_rows: int, ended: float, deadline: float) -> None:
        while self._held_rows < min(expected_rows, max_rows):
            wait_until, outcome = deadline, "deadline"
            if self._last_arrival > ended:  # arrivals have begun: a pause means the rest are not coming soon
                pause_ends = self._last_arrival + self.refill_gap_s
                if pause_ends < wait_until:
                    wait_until, outcome = pause_ends, "pause"
            remaining = wait_until - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        else:
            outcome = "all_back" if self._held_rows >= expected_rows else "full"
        self._refill = None
        if self._on_refill is not None:
            self._on_refill(outcome, time.monotonic() - ended)
        if not self._passes_running:
            self._release()

    def _release(self) -> None:
        self._held_rows = 0
        self._open.set()
