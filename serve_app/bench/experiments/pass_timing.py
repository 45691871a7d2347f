"""EXPERIMENT: is a batch-1 image pass slower outside the bare loop? (BENCHMARKS.md, the c=1 lead)

    python -m serve_app.bench.experiments.pass_timing            # driver, thread pool, Ray task, nice 15
    python -m serve_app.bench.experiments.pass_timing --gaps     # idle gaps between passes, as the hops leave

The same `EncoderCore.encode_images` (ViT-B-32, random weights, 2 threads) the served encoder runs, p50 of
40 passes after 5 warm-up passes.
"""

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def _core():
    from serve_app.config import ModelSpec
    from serve_app.encoder import EncoderCore

    return EncoderCore(ModelSpec(model="ViT-B-32", pretrained="random", device="cpu", torch_threads=2))


def _p50_ms(core, gap_s: float = 0.0, passes: int = 40) -> float:
    import torch

    pixels = torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8)
    for _ in range(5):
        core.encode_images(pixels)
    times = []
    for _ in range(passes):
        if gap_s:
            time.sleep(gap_s)
        started = time.perf_counter()
        core.encode_images(pixels)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def where(nice: int | None = None) -> dict:
    """p50 in this process's main thread and in a one-thread pool (the served encoder's forward thread)."""
    if nice is not None:
        os.nice(nice)
    core = _core()
    return {"nice": os.nice(0), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "main_ms": _p50_ms(core), "thread_pool_ms": ThreadPoolExecutor(1).submit(_p50_ms, core).result()}


def main(argv: list[str]) -> int:
    if "--gaps" in argv:
        core = _core()
        for gap in (0.0, 0.01, 0.04, 0.0, 0.04):
            print(f"gap {gap * 1000:4.0f} ms: pass p50 {_p50_ms(core, gap)} ms")
        return 0
    print("driver       ", where())
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        print("Ray task     ", ray.get(ray.remote(num_cpus=1)(where).remote()))
    finally:
        ray.shutdown()
    print("driver nice15", where(nice=15))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
