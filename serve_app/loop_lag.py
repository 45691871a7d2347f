"""How late a replica's event loop runs a timer, and how much of that its own thread spent computing.

A loop that a CPU-heavy step holds answers every request late by as much; so does a process that the machine
does not schedule, or a thread waiting for the GIL. A timer every INTERVAL_S measures the lateness (`lag`);
the loop thread's own CPU time over the same interval bounds what of it was the loop's own work (`blocked`:
a callback that runs 100 ms uses 100 ms of the thread's CPU, a starved process uses none). The lag is
exported as `clip_event_loop_lag_seconds`; the worst of both since start (or a reset) is what `report` gives,
which the hostile-corpus test asks each replica for.
"""

import asyncio
import time
from dataclasses import dataclass

from serve_app import metrics

INTERVAL_S = 0.05


@dataclass
class LoopLag:
    worst_lag_s: float = 0.0
    worst_blocked_s: float = 0.0
    samples: int = 0
    _task: "asyncio.Task[None] | None" = None

    def ensure_started(self) -> None:
        """Starts the timer on the running loop, once (a replica's constructor may run before its loop does)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(INTERVAL_S)
            lag = max(0.0, loop.time() - start - INTERVAL_S)
            blocked = min(lag, time.thread_time() - cpu)
            self.worst_lag_s = max(self.worst_lag_s, lag)
            self.worst_blocked_s = max(self.worst_blocked_s, blocked)
            self.samples += 1
            metrics.observe_loop_lag(lag)

    def report(self, reset: bool = False) -> dict[str, float]:
        report = {"worst_lag_s": round(self.worst_lag_s, 4), "worst_blocked_s": round(self.worst_blocked_s, 4),
                  "samples": self.samples}
        if reset:
            self.worst_lag_s, self.worst_blocked_s, self.samples = 0.0, 0.0, 0
        return report


# One per process: the ingress's middleware and the preprocessor start theirs; read through this module (Ray
# Serve may pickle a deployment class by value, and a class-level reference would read a copy).
REPLICA_LOOP = LoopLag()
