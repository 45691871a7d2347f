"""EXPERIMENT: one fp32 linear layer three ways, at the shapes of ViT-B-32's passes (BENCHMARKS.md, cpu_kernels)

    python -m serve_app.bench.experiments.linear_kernels [--threads 2] [--rounds 3]

`F.linear` (PyTorch's CPU path: MKL's sgemm), MKL's own packed-weight API (`torch.ops.mkl._mkl_linear`, what
torch.compile's CPU backend uses for frozen fp32 weights) and oneDNN on a weight reordered once
(`torch.ops.mkldnn._linear_pointwise`, serve_app/cpu_kernels.py). Twelve distinct weights per shape, one per
layer, so weights come from memory as in a real pass; rows: one short caption (10 tokens), 32 captions, one
image (50 patches + class token), 32 images. Variants alternate within each round; µs per call, the median
over rounds.
"""

import argparse
import statistics
import time

# (what, rows, in, out) for ViT-B-32: text width 512, vision width 768
SHAPES = [
    ("text qkv, 1 caption", 10, 512, 1536),
    ("text mlp in, 1 caption", 10, 512, 2048),
    ("text qkv, 32 captions", 320, 512, 1536),
    ("image qkv, 1 image", 50, 768, 2304),
    ("image mlp in, 1 image", 50, 768, 3072),
    ("image mlp out, 1 image", 50, 3072, 768),
    ("image mlp in, 32 images", 1600, 768, 3072),
]
LAYERS = 12


def _time_us(step, calls: int) -> float:
    step()
    started = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds; µs per call (median)")
    print("| shape | rows | F.linear (MKL) | MKL packed | oneDNN packed | F.linear / oneDNN |")
    print("|---|---|---|---|---|---|")
    with torch.inference_mode():
        for what, rows, fan_in, fan_out in SHAPES:
            weights = [torch.randn(fan_out, fan_in) for _ in range(LAYERS)]
            biases = [torch.randn(fan_out) for _ in range(LAYERS)]
            x = torch.randn(rows, fan_in)
            mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
            onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]
            want = F.linear(x, weights[0], biases[0])
            for got in (torch.ops.mkl._mkl_linear(x, mkl[0], weights[0], biases[0], rows),
                        torch.ops.mkldnn._linear_pointwise(x, onednn[0], biases[0], "none", [], "")):
                torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)  # same fp32 product
            variants = {
                "eager": lambda: [F.linear(x, w, b) for w, b in zip(weights, biases)],
                "mkl": lambda: [torch.ops.mkl._mkl_linear(x, p, w, b, rows) for p, w, b in zip(mkl, weights, biases)],
                "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                                   for p, b in zip(onednn, biases)],
            }
            calls = max(2, int(2e8 // (rows * fan_in * fan_out * LAYERS)))
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, step in variants.items():
                    times[name].append(_time_us(step, calls) / LAYERS)
            eager, mkl_us, onednn_us = (statistics.median(times[n]) for n in ("eager", "mkl", "onednn"))
            print(f"| {what} | {rows} | {eager:.0f} | {mkl_us:.0f} | {onednn_us:.0f} | {eager / onednn_us:.2f} |")


if __name__ == "__main__":
    main()
