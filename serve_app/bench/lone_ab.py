"""A lone client's latency, two checkouts side by side: both servers up at once, windows alternating.

    python -m serve_app.bench.lone_ab --layout pools --rounds 6 --window 5 /tmp/wt-before /tmp/wt-after

Sequential runs on a shared two-core machine differ by more than a millisecond from the machine alone, which is
the size of the change this must see. Here each checkout (a `git worktree` of each commit: `serve run` imports
the app from its working directory, and Ray's workers take the driver's path) serves the tiny model in the
given layout, both at once and idle but for the window under way; one client at a time sends single texts, then
single images, to each in turn (ABAB…, then BABA… in odd rounds). It prints one JSON line per window (p50, p99,
CPU per request of that server's process tree) and the median of each checkout's p50s. Also the in-process cost
of `Coalescer` for a lone request against a direct await (`--overhead-calls`).
"""

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any


def _tree_server(tree: str, workdir: Path, args: dict[str, Any]) -> Any:
    """`OurServer` whose `serve run` starts in another checkout."""
    from serve_app.bench.servers import OurServer

    class TreeServer(OurServer):
        def cwd(self) -> str:
            return tree

    server = TreeServer(workdir, args)
    server.tree = tree
    return server


def lone_windows(layout: str, trees: list[str], rounds: int, window_s: float, workdir: Path) -> list[dict[str, Any]]:
    from serve_app.bench.compare import CompareSettings, merge_args, one_process_app_args, our_app_args
    from serve_app.bench.cpu import _payload, tree_cpu_s
    from serve_app.bench.loadgen import Level, LoadSettings, run_load
    from serve_app.dev_model import write_tiny_model

    model_dir = workdir / "tiny-clip"
    if not (model_dir / "open_clip_config.json").exists():
        write_tiny_model(model_dir, seed=0)
    compare = CompareSettings(model=f"local-dir:{model_dir}", pretrained=None, threads=1, app_args={})
    args = one_process_app_args(compare) if layout == "one-process" else our_app_args(compare)
    args = merge_args(args, {"request_timeout_s": 120, "limits": {"max_requests_in_flight": 1024}})
    servers = [_tree_server(tree, workdir / f"{layout}-{i}", args) for i, tree in enumerate(trees)]
    rows = []
    try:
        for server in servers:
            server.start()
        served = args["served_model_name"]
        for server in servers:
            server.wait_ready(_payload("text", 1, served), 600)
        for kind in ("text", "image"):
            payload = _payload(kind, 1, served)
            for server in servers:
                run_load(server.base_url, payload, [Level(concurrency=1)],
                         LoadSettings(duration_s=2, warmup_s=0, progress=False))
            for index in range(rounds):
                for server in servers if index % 2 == 0 else servers[::-1]:
                    before = tree_cpu_s(server.process.pid)
                    (result,) = run_load(server.base_url, payload, [Level(concurrency=1)],
                                         LoadSettings(duration_s=window_s, warmup_s=0.3, progress=False))
                    cpu_s = tree_cpu_s(server.process.pid) - before
                    row = {"layout": layout, "tree": server.tree, "payload": f"{kind} x1", "round": index,
                           "p50_ms": round(result.latency_ms["p50"], 3), "p99_ms": round(result.latency_ms["p99"], 3),
                           "ok": result.ok, "errors": result.errors,
                           "cpu_ms_per_request": round(1000 * cpu_s / max(result.sent, 1), 3)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        for server in servers:
            server.stop()
    return rows


def coalescer_overhead_us(calls: int = 20_000, rounds: int = 3) -> dict[str, float]:
    """CPU µs per lone call: a direct await of an answer one loop iteration away, and the same through a
    `Coalescer` (the best of `rounds`)."""
    import numpy as np
    import torch

    from serve_app.coalescing import Coalescer

    answer = np.zeros((1, 512), dtype=np.float32)

    async def send(rows: Any) -> np.ndarray:
        await asyncio.sleep(0)
        return answer

    async def measure() -> dict[str, float]:
        rows = torch.zeros((1, 77), dtype=torch.long)
        coalescer = Coalescer(send, max_in_flight=2, max_rows=64)
        best = {"direct": float("inf"), "coalescer": float("inf")}
        for _ in range(rounds):
            for name, call in (("direct", send), ("coalescer", coalescer)):
                start = time.process_time()
                for _ in range(calls):
                    await call(rows)
                best[name] = min(best[name], 1e6 * (time.process_time() - start) / calls)
        return {k: round(v, 1) for k, v in best.items()}

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs=2, help="two checkouts (git worktrees)")
    parser.add_argument("--layout", default="pools", choices=["pools", "one-process"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--window", type=float, default=5.0, help="seconds per window")
    parser.add_argument("--workdir", default="/tmp/clip-bench-lone-ab")
    parser.add_argument("--overhead-calls", type=int, default=20_000, help="0: skip the in-process measurement")
    args = parser.parse_args()
    rows = lone_windows(args.layout, args.trees, args.rounds, args.window, Path(args.workdir))
    for payload in ("text x1", "image x1"):
        for tree in args.trees:
            p50s = [r["p50_ms"] for r in rows if r["payload"] == payload and r["tree"] == tree]
            print(f"{args.layout} {payload} {tree}: median p50 {statistics.median(p50s):.2f} ms of {p50s}")
    if args.overhead_calls:
        print(f"coalescer, in-process CPU µs per lone call: {coalescer_overhead_us(args.overhead_calls)}")


if __name__ == "__main__":
    main()
