"""One OpenMP team per serving process (serve_app/openmp.py): after the one-process layout has loaded its model,
tokenized a long list, decoded images and run passes, the process holds the forward thread's team and no other.

Counted in a fresh interpreter (a test process has its own teams from earlier tests): OpenMP's worker threads are
the OS threads that Python did not start. A second team would add one more; libgomp then makes every team sleep
at its barriers, which is what this guards against (BENCHMARKS.md, "One OpenMP team per process").
"""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import asyncio, json, os, sys, threading
from types import SimpleNamespace

from ray.serve import batching

from serve_app.bench.payloads import jpeg_data_uri, synthetic_jpeg
from serve_app.config import ImageLimits, ModelSpec
from serve_app.in_process import in_process_pools

def openmp_workers() -> int:
    return len(os.listdir("/proc/self/task")) - threading.active_count()

# `@serve.batch` reads the replica's max_ongoing_requests when its queue starts (for a warning only).
context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=256))
batching.serve.get_replica_context = lambda: context

before = openmp_workers()
spec = ModelSpec(model="local-dir:" + sys.argv[1], served_model_name="tiny", torch_threads=2)
preprocessor, encoders = in_process_pools([spec], ImageLimits())

async def serve_some():
    batch = await preprocessor.texts.remote("tiny", ["a photo of a dog on a sofa"] * 1000)
    texts = await encoders["tiny"].embed_texts.remote(batch.tokens)
    uris = [jpeg_data_uri(synthetic_jpeg(640, 480, seed=i)) for i in range(8)]
    pixels = preprocessor.images.remote("tiny", uris, ["input"] * len(uris))
    images = await encoders["tiny"].embed_images.remote(pixels)
    return len(texts), len(images)

rows = asyncio.run(serve_some())
print(json.dumps({"rows": rows, "workers_before": before, "workers_after": openmp_workers()}))
"""


def test_one_process_layout_keeps_one_openmp_team(tiny_model_dir: Path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == [1000, 8]
    # torch_threads=2: the forward thread's team is itself plus one worker, and nothing else started one.
    assert result["workers_after"] - result["workers_before"] == 1, result
