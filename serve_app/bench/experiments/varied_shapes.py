"""EXPERIMENT: memory and time over text passes of varied shapes, per CPU kernel (BENCHMARKS.md, cpu_kernels)

    python -m serve_app.bench.experiments.varied_shapes [--loops 2] [--shapes 300] [--max-batch 32]

ViT-B-32 (random weights, 2 threads) through `EncoderCore.encode_texts`, as served: the same list of random
(batch 1..max, length 3..77) token tensors run `--loops` times, in a fresh process per variant: `eager`
(open_clip's modules), `onednn` (serve_app/cpu_kernels.py as shipped) and `onednn-unpadded` (the same with
every row count sent to oneDNN as it is). Prints the process's RSS after each loop, and after glibc's
`malloc_trim(0)` hands back what its heap holds free.
"""

import argparse
import ctypes
import os
import random
import subprocess
import sys
import time

from serve_app.bench.report import process_rss

VARIANTS = ("eager", "onednn", "onednn-unpadded")


def _rss_mib() -> float:
    return process_rss(os.getpid())[1] / 2**20


def run_variant(variant: str, loops: int, count: int, max_batch: int) -> None:
    import torch

    from serve_app import cpu_kernels
    from serve_app.config import ModelSpec
    from serve_app.encoder import EncoderCore

    if variant == "onednn-unpadded":
        cpu_kernels.padded_rows = lambda rows: rows
    kernels = "eager" if variant == "eager" else "onednn"
    core = EncoderCore(ModelSpec(model="ViT-B-32", pretrained="random", device="cpu", torch_threads=2,
                                 cpu_kernels=kernels))
    rng = random.Random(0)
    shapes = [(rng.randint(1, max_batch), rng.randint(3, 77)) for _ in range(count)]
    rss = [_rss_mib()]
    started = time.perf_counter()
    for _ in range(loops):
        for batch, length in shapes:
            tokens = torch.randint(1, 49000, (batch, length))
            tokens[:, -1] = 49407  # end of text: nothing to trim
            core.encode_texts(tokens)
        rss.append(_rss_mib())
    seconds = time.perf_counter() - started
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    print(f"| {variant} | {seconds:.1f} | {' → '.join(f'{r:.0f}' for r in rss)} | {_rss_mib():.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=2)
    parser.add_argument("--shapes", type=int, default=300)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.loops, args.shapes, args.max_batch)
        return
    print(f"{args.shapes} random text shapes (batch 1-{args.max_batch}, length 3-77), {args.loops} loops")
    print("| variant | seconds | RSS MiB: loaded → after each loop | after malloc_trim |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        subprocess.run([sys.executable, "-m", "serve_app.bench.experiments.varied_shapes", "--variant", variant,
                        "--loops", str(args.loops), "--shapes", str(args.shapes), "--max-batch", str(args.max_batch)],
                       check=True, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
