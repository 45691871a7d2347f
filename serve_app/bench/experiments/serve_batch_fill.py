"""EXPERIMENT: does Ray Serve's `@serve.batch` fill its batches while the model is busy? (No, in Ray 2.60.)

A 40 ms "forward pass" (+2 ms per row) on one worker thread, 32 concurrent callers through a handle, for
8 s each: Ray's `@serve.batch` (5 ms wait, as `ClipEncoder` uses it) against a drain-when-free batcher that
forms the next batch only once the previous forward has returned. Prints calls/s and the batch sizes.

    python -m serve_app.bench.experiments.serve_batch_fill

Measured twice on the 2-core dev VM (BENCHMARKS.md): @serve.batch 66.6 and 78.4 calls/s, mean batch 3.0 and 3.6;
drain-when-free 221.9 calls/s, mean batch 15.8.
"""

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor

CALLERS = 32
SECONDS = 8.0


def forward(rows: int) -> list[int]:
    time.sleep(0.040 + 0.002 * rows)
    return [0] * rows


def main() -> None:
    import ray
    from ray import serve

    @serve.deployment(max_ongoing_requests=256)
    class RayBatched:
        def __init__(self) -> None:
            self.pool = ThreadPoolExecutor(1)
            self.sizes: list[int] = []

        async def __call__(self, x: int) -> int:
            return await self.batched(x)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=len)
        async def batched(self, items: list[int]) -> list[int]:
            self.sizes.append(len(items))
            return await asyncio.get_running_loop().run_in_executor(self.pool, forward, len(items))

        def stats(self) -> list[int]:
            return self.sizes

    @serve.deployment(max_ongoing_requests=256)
    class DrainWhenFree:
        def __init__(self) -> None:
            self.pool = ThreadPoolExecutor(1)
            self.sizes: list[int] = []
            self.pending: collections.deque = collections.deque()
            self.wakeup = asyncio.Event()
            self.task: asyncio.Task | None = None

        async def __call__(self, x: int) -> int:
            loop = asyncio.get_running_loop()
            if self.task is None:
                self.task = loop.create_task(self._consume())
            future = loop.create_future()
            self.pending.append(future)
            self.wakeup.set()
            return await future

        async def _consume(self) -> None:
            loop = asyncio.get_running_loop()
            while True:
                while not self.pending:
                    self.wakeup.clear()
                    await self.wakeup.wait()
                batch = [self.pending.popleft() for _ in range(min(32, len(self.pending)))]
                self.sizes.append(len(batch))
                results = await loop.run_in_executor(self.pool, forward, len(batch))
                for future, result in zip(batch, results):
                    future.set_result(result)

        def stats(self) -> list[int]:
            return self.sizes

    async def drive(handle) -> float:
        done = 0
        end = time.time() + SECONDS

        async def caller() -> None:
            nonlocal done
            while time.time() < end:
                await handle.remote(1)
                done += 1

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        return done / SECONDS

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name, deployment in (("RayBatched", RayBatched), ("DrainWhenFree", DrainWhenFree)):
            handle = serve.run(deployment.bind(), name=name, route_prefix=None)
            rate = asyncio.run(drive(handle))
            sizes = handle.stats.remote().result()
            histogram = sorted(collections.Counter(sizes).items())
            print(f"{name}: {rate:.1f} calls/s; {len(sizes)} batches, mean size {sum(sizes) / len(sizes):.1f}; "
                  f"sizes {histogram}", flush=True)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
