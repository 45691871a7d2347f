"""`clip-bench calls`: what one Ray Serve handle call costs in CPU, whatever it carries, and what the pixels'
hop from the preprocessor to the encoder adds per image.

    clip-bench calls --calls 3000 --concurrency 32 --image-size 224

A local Ray of its own (the serving environment, deploy/ray-serve.env and the small-CPU tuning; no HTTP) runs
three deployments shaped like the service's, with no work in them: a caller (the ingress), a preprocessor that
returns zeroed uint8 pixels and an encoder that returns zeroed float32 vectors. The caller makes `calls` handle
calls, `concurrency` at a time, of each kind:

- `noop`: a call with no argument and no answer: Ray's own cost of a call;
- `text xR`: R rows of token ids (int64, 77 wide) in, R vectors out (the ingress's call for a text request);
- `image xN`: the preprocessor's answer passed on to the encoder (`encoder.embed_images.remote(prep_response)`),
  N images of pixels; `image x0` is the same two calls with no pixels, so that (`image xN` − `image x0`) / N is
  the hop's cost per image.

Rows and pixels travel as torch tensors (what the service sends today) and, as `numpy`, as numpy arrays: torch
pickles a tensor's storage through its own serialiser, several times slower than numpy's buffer. Each kind runs
with Serve's default for the handles (in its throughput mode, calls by value over gRPC: a preprocessor's answer
passed on is awaited by the caller, and its pixels pass through the caller's process) and, for images, by
reference (`handle.options(_by_reference=True)`: Ray's object store, the caller holds a reference only).

CPU is every process of this Ray instance (GCS, raylet, the replicas; the driver waits), read from /proc before
and after each window, less what the idle instance spends over the same wall time; a process's share tells
where it goes.
"""

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CONTEXT = 77


@dataclass
class CallsSettings:
    calls: int = 3000
    concurrency: int = 32
    text_rows: list[int] = field(default_factory=lambda: [1, 16])
    images: list[int] = field(default_factory=lambda: [1, 8])
    image_size: int = 224
    dim: int = 512
    latency_calls: int = 300  # calls one at a time, for the p50 of a lone caller
    idle_s: float = 5.0


def _kinds(settings: CallsSettings) -> list[tuple[str, int, bool, bool]]:
    """(kind, rows, by_reference, numpy) of each window."""
    kinds = [("noop", 0, False, False)]
    for numpy in (False, True):
        kinds += [("text", r, False, numpy) for r in settings.text_rows]
    for by_reference, numpy in ((False, False), (False, True), (True, False)):
        kinds += [("image", n, by_reference, numpy) for n in [0, *settings.images]]
    return kinds


def _label(kind: str, rows: int, by_reference: bool, numpy: bool) -> str:
    if kind == "noop":
        return "noop"
    return f"{kind} x{rows}" + (" numpy" if numpy else "") + (" by reference" if by_reference else "")


def _role(pid: int) -> str:
    """Which part of the Ray instance a process is, by its title."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    for role in ("Caller", "Prep", "Enc"):
        if f"ServeReplica:calls:{role}" in title:
            return role.lower()
    for role in ("gcs_server", "raylet", "ServeController", "dashboard", "log_monitor"):
        if role in title:
            return role
    return "driver" if pid == os.getpid() else "other"


def _cpu_by_role() -> dict[str, float]:
    from serve_app.bench.cpu import CLOCK_TICKS
    from serve_app.bench.report import process_tree

    roles: dict[str, float] = {}
    for pid in process_tree(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        role = _role(pid)
        roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return roles


def _app(settings: CallsSettings) -> Any:
    import numpy as np
    import torch
    from ray import serve

    options = {"max_ongoing_requests": 1024, "max_queued_requests": -1, "ray_actor_options": {"num_cpus": 0}}

    @serve.deployment(**options)
    class Prep:
        def __init__(self) -> None:
            self._pixels: dict[int, torch.Tensor] = {}

        def pixels(self, n: int, numpy: bool) -> Any:
            if n not in self._pixels:  # one tensor per count: a slice would pickle its whole storage
                self._pixels[n] = torch.zeros((n, 3, settings.image_size, settings.image_size), dtype=torch.uint8)
            return self._pixels[n].numpy() if numpy else self._pixels[n]

    @serve.deployment(**options)
    class Enc:
        def noop(self) -> None:
            return None

        def embed_texts(self, tokens: Any) -> np.ndarray:
            return np.zeros((len(tokens), settings.dim), dtype=np.float32)

        def embed_images(self, pixels: Any) -> np.ndarray:
            assert pixels.dtype in (torch.uint8, np.uint8)
            return np.zeros((len(pixels), settings.dim), dtype=np.float32)

    @serve.deployment(max_ongoing_requests=4, ray_actor_options={"num_cpus": 0})
    class Caller:
        def __init__(self, prep: Any, enc: Any) -> None:
            self._prep, self._enc = prep, enc

        async def run(self, kind: str, rows: int, by_reference: bool, numpy: bool, calls: int,
                      concurrency: int) -> list[float]:
            """Seconds of each call."""
            prep = self._prep.options(_by_reference=True) if by_reference else self._prep
            enc = self._enc.options(_by_reference=True) if by_reference else self._enc
            tokens = torch.zeros((rows, CONTEXT), dtype=torch.long)
            if numpy:
                tokens = tokens.numpy()
            latencies: list[float] = []
            left = calls

            async def one() -> None:
                if kind == "noop":
                    await enc.noop.remote()
                elif kind == "text":
                    await enc.embed_texts.remote(tokens)
                else:
                    await enc.embed_images.remote(prep.pixels.remote(rows, numpy))

            async def worker() -> None:
                nonlocal left
                while left > 0:
                    left -= 1
                    start = time.perf_counter()
                    await one()
                    latencies.append(time.perf_counter() - start)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return latencies

    return Caller.bind(Prep.bind(), Enc.bind())


async def run_calls(settings: CallsSettings) -> dict[str, Any]:
    """In a process whose environment is the serving one (set before Ray is imported): see `main`. On an
    event loop: in Serve's throughput mode a handle's router runs on its caller's loop."""
    import ray
    from ray import serve

    from serve_app.bench.report import latency_summary, machine_info

    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(proxy_location="Disabled")
    caller = serve.run(_app(settings), name="calls", route_prefix=None)
    for kind in _kinds(settings):  # warm every path
        await caller.run.remote(*kind, 200, settings.concurrency)
    idle_before, start = _cpu_by_role(), time.perf_counter()
    await asyncio.sleep(settings.idle_s)
    idle_after, idle_wall = _cpu_by_role(), time.perf_counter() - start
    idle_rate = (sum(idle_after.values()) - sum(idle_before.values())) / idle_wall
    rows_out = []
    for kind in _kinds(settings):
        before, start = _cpu_by_role(), time.perf_counter()
        latencies = await caller.run.remote(*kind, settings.calls, settings.concurrency)
        after, wall = _cpu_by_role(), time.perf_counter() - start
        spent = {role: after.get(role, 0.0) - before.get(role, 0.0) for role in after}
        net = sum(spent.values()) - idle_rate * wall
        alone = await caller.run.remote(*kind, settings.latency_calls, 1)
        rows_out.append({
            "kind": _label(*kind), "calls": settings.calls, "wall_s": round(wall, 3),
            "calls_per_s": round(settings.calls / wall, 1),
            "cpu_us_per_call": round(1e6 * sum(spent.values()) / settings.calls, 1),
            "net_cpu_us_per_call": round(1e6 * net / settings.calls, 1),
            "cpu_us_per_call_by_process": {k: round(1e6 * v / settings.calls, 1) for k, v in sorted(spent.items())
                                           if v > 0},
            "latency_ms_at_concurrency": latency_summary(latencies),
            "c1_p50_ms": latency_summary(alone)["p50"],
        })
    return {"tool": "clip-bench calls", "settings": asdict(settings), "machine": machine_info(),
            "idle_cpu_cores": round(idle_rate, 3), "rows": rows_out, "hop_per_image": _hop_per_image(rows_out)}


def _hop_per_image(rows: list[dict[str, Any]]) -> dict[str, float]:
    """(image xN − image x0) / N in net CPU µs, for each way of passing them."""
    by_label = {r["kind"]: r for r in rows}
    out = {}
    for label, row in by_label.items():
        if not label.startswith("image x") or label.startswith("image x0"):
            continue
        count, *rest = label.split()[1:]
        base = by_label.get(" ".join(["image", "x0", *rest]))
        if base:
            out[label] = round((row["net_cpu_us_per_call"] - base["net_cpu_us_per_call"]) / int(count[1:]), 1)
    return out


def calls_table(report: dict[str, Any]) -> str:
    from serve_app.bench.report import format_table

    table = format_table(
        ["kind", "calls/s", "CPU µs/call", "net of idle", "by process (µs/call)", "p50 ms", "c=1 p50 ms"],
        [[r["kind"], r["calls_per_s"], r["cpu_us_per_call"], r["net_cpu_us_per_call"],
          ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_us_per_call_by_process"].items() if v >= 5),
          f"{r['latency_ms_at_concurrency']['p50']:.2f}", f"{r['c1_p50_ms']:.2f}"] for r in report["rows"]],
    )
    hops = ", ".join(f"{k}: {v} µs" for k, v in report["hop_per_image"].items())
    return (f"{table}\n\nidle instance: {report['idle_cpu_cores']} cores\n"
            f"the pixels' hop per image (net CPU, minus image x0): {hops}")


def launch(settings: CallsSettings, out: Path) -> int:
    """Runs `main` in a child process with the serving environment, in a session of its own (everything Ray
    started ends with it)."""
    from serve_app.processes import run_in_own_session
    from serve_app.ray_env import node_ports, serve_env, small_cpu_env

    env = {**os.environ, **serve_env(), **small_cpu_env(), **node_ports()}
    env.pop("RAY_ADDRESS", None)
    return run_in_own_session([sys.executable, "-m", "serve_app.bench.ray_calls", json.dumps(asdict(settings)),
                               str(out)], env)


def main() -> None:
    settings = CallsSettings(**json.loads(sys.argv[1]))
    report = asyncio.run(run_calls(settings))
    Path(sys.argv[2]).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
