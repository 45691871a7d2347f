"""EXPERIMENT: the load generator's own CPU per request, httpx against aiohttp (BENCHMARKS.md).

    python -m serve_app.bench.experiments.client_cpu                          # starts the one-process service
    python -m serve_app.bench.experiments.client_cpu --url http://127.0.0.1:8000 --model bench

The client runs on the same two cores as the server it measures, so every ms of CPU it spends per request
is taken from the server. Both clients send the same pre-serialised text requests at the same concurrency,
one after the other, `--rounds` times; the CPU is this process's own (user + system, `getrusage`), divided by
the requests sent. Responses are read and parsed as JSON, as `clip-bench load` does to verify them.
"""

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _httpx(url: str, bodies: list[bytes], requests: int, concurrency: int) -> None:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120.0, trust_env=False) as client:
        async def worker(first: int) -> None:
            for i in range(first, requests, concurrency):
                response = await client.post(url, content=bodies[i % len(bodies)],
                                             headers={"content-type": "application/json"})
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}")
                json.loads(response.content)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def _aiohttp(url: str, bodies: list[bytes], requests: int, concurrency: int) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120.0)) as session:
        async def worker(first: int) -> None:
            for i in range(first, requests, concurrency):
                async with session.post(url, data=bodies[i % len(bodies)],
                                        headers={"content-type": "application/json"}) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
                json.loads(body)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))


CLIENTS = {"httpx": _httpx, "aiohttp": _aiohttp}


def measure(base_url: str, model: str, requests: int, concurrency: int, rounds: int) -> list[dict]:
    from serve_app.bench.payloads import TextPayload

    payload = TextPayload(model=model, distinct=128).prepare()
    bodies = [payload.request(i).body for i in range(128)]
    url = base_url.rstrip("/") + "/v1/embeddings"
    rows = []
    for round_ in range(1, rounds + 1):
        for name, client in CLIENTS.items():
            cpu, started = _cpu_seconds(), time.perf_counter()
            asyncio.run(client(url, bodies, requests, concurrency))
            wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
            rows.append({"round": round_, "client": name, "requests_per_s": requests / wall,
                         "cpu_ms_per_request": 1000 * cpu / requests})
            print(f"round {round_} {name:8s} {requests / wall:7.1f} requests/s  "
                  f"{1000 * cpu / requests:5.2f} ms CPU per request", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server; default: start the one-process service (ViT-B-32)")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/clip-bench-client-cpu")
    args = parser.parse_args(argv)
    if args.url:
        measure(args.url, args.model, args.requests, args.concurrency, args.rounds)
        return 0
    from serve_app.bench.payloads import TextPayload
    from serve_app.bench.servers import OurServer

    app_args = {"model": "ViT-B-32", "pretrained": "random", "served_model_name": args.model, "torch_threads": 2,
                "layout": "one-process"}
    server = OurServer(Path(args.workdir), app_args)
    server.start()
    try:
        server.wait_ready(TextPayload(model=args.model, distinct=8).prepare(), 180)
        measure(server.base_url, args.model, args.requests, args.concurrency, args.rounds)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
