"""Benchmarks of the service: honest, side by side, in one run (`clip-bench` / `python -m serve_app.bench`).

    clip-bench bare     the model in-process, no server (the reference every ratio is taken against)
    clip-bench load     a load generator against any OpenAI-compatible embeddings URL
    clip-bench compare  bare, our service (`serve run`), a naive server and infinity-emb, in one run
    clip-bench gpu      the GPU run (ViT-g/14 bf16/fp16, compile, SDPA, MFU, served throughput)

Importing this package loads neither torch nor ray; each mode imports what it needs.
"""
