"""EXPERIMENT: the serving path's own latency at concurrency 1, per layout and batch wait (BENCHMARKS.md).

    python -m serve_app.bench.experiments.path_latency            # 2 rounds x (pools, one-process) x (2 ms, 0)

A tiny random open_clip model (forward pass ~1 ms) behind the service as it runs in production (`serve run`,
deploy/ray-serve.env), so what is measured is HTTP, the hops and the batch wait, not the model: one client,
8 s per payload (short texts; 640x480 JPEGs) after 1 s of warm-up.
"""

import sys
import tempfile
from pathlib import Path

from serve_app.bench.loadgen import Level, LoadSettings, run_load
from serve_app.bench.payloads import ImagePayload, TextPayload
from serve_app.bench.servers import OurServer
from serve_app.dev_model import write_tiny_model

WAITS_S = (0.002, 0.0)  # the default batch wait, and none


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv else 2
    workdir = Path(tempfile.mkdtemp(prefix="path-latency-"))
    model = write_tiny_model(workdir / "tiny")
    payloads = {
        "text": TextPayload(model="tiny", distinct=64).prepare(),
        "image": ImagePayload(model="tiny", width=640, height=480, quality=85, distinct=32).prepare(),
    }
    for round_ in range(rounds):
        for layout in ("pools", "one-process"):
            for wait in WAITS_S:
                batching = {"batch_wait_timeout_s": wait, "text_batch_wait_timeout_s": wait}
                args = {"layout": layout, "models": [{"model": f"local-dir:{model}", "served_model_name": "tiny",
                                                      "torch_threads": 1, "batching": batching}]}
                server = OurServer(workdir / f"{layout}-{wait}-{round_}", args)
                server.start()
                try:
                    server.wait_ready(payloads["text"], 120)
                    cells = []
                    for name, payload in payloads.items():
                        (result,) = run_load(server.base_url, payload, [Level(concurrency=1)],
                                             LoadSettings(duration_s=8, warmup_s=1, progress=False))
                        cells.append(f"{name} {result.items_per_s:.1f}/s p50 {result.latency_ms['p50']:.1f} ms")
                    print(f"round {round_} {layout:11s} batch wait {wait * 1000:.0f} ms: " + "; ".join(cells), flush=True)
                finally:
                    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
