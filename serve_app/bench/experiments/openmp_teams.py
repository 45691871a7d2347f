"""EXPERIMENT: a second OpenMP team in the process slows every forward pass (BENCHMARKS.md, "One OpenMP team").

    python -m serve_app.bench.experiments.openmp_teams

Batch-1 passes of a short caption (`EncoderCore`, ViT-B-32, random weights, 2 torch threads) on a forward thread,
p50 of 60 passes and the forward thread's voluntary context switches per pass (its sleeps), while: nothing else
has used torch; the model loaded on another thread than the one running the passes (as the encoder did before);
the main thread has tokenized 1,000 texts (a parallel fill of the token tensor starts an OpenMP team there), with
and without `keep_torch_serial_on_this_thread()` first. One fresh process per scenario.
"""

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor


def _passes(core) -> str:
    """`pass_timing`'s batch-1 text passes (60), on the calling thread, and who else holds threads."""
    from serve_app.bench.experiments.pass_timing import _p50_ms

    switches: dict = {}
    p50 = _p50_ms(core, passes=60, switches=switches, kind="text")
    workers = len(os.listdir("/proc/self/task")) - threading.active_count()
    return f"p50 {p50:5.1f} ms, {switches['voluntary']:4.1f} sleeps/pass, {workers} threads Python did not start"


def _scenario(label: str, load_on_forward: bool, tokenize_elsewhere: bool, guarded: bool) -> None:
    """A fresh process per scenario: libgomp's teams live as long as the threads that started them."""
    import open_clip

    from serve_app.config import ModelSpec
    from serve_app.encoder import EncoderCore
    from serve_app.openmp import keep_torch_serial_on_this_thread

    forward = ThreadPoolExecutor(1, thread_name_prefix="forward")
    spec = ModelSpec(model="ViT-B-32", pretrained="random", device="cpu", torch_threads=2)
    core = forward.submit(EncoderCore, spec).result() if load_on_forward else EncoderCore(spec)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    if tokenize_elsewhere:  # on the main thread, which lives on as an event loop thread would
        if guarded:
            keep_torch_serial_on_this_thread()
        tokenizer(["a photo of a dog"] * 1000)
    print(f"{label:<58} {forward.submit(_passes, core).result()}", flush=True)


SCENARIOS = {
    "one team: model loaded and passes on the forward thread": (True, False, False),
    "model loaded on the main thread, passes on the forward thread": (False, False, False),
    "the main thread tokenized 1,000 texts": (True, True, False),
    "the same, that thread kept serial (serve_app/openmp.py)": (True, True, True),
}


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--one":
        _scenario(argv[1], *SCENARIOS[argv[1]])
        return 0
    rounds = int(argv[0]) if argv else 2
    for _ in range(rounds):
        for label in SCENARIOS:
            subprocess.run([sys.executable, "-m", "serve_app.bench.experiments.openmp_teams", "--one", label],
                           check=True, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
