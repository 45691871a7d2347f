"""EXPERIMENT: which threads of the machine run *during* the served forward passes at concurrency 1.

    python -m serve_app.bench.experiments.pass_neighbours            # short texts
    python -m serve_app.bench.experiments.pass_neighbours --images   # 640x480 JPEGs

ViT-B-32 (random weights, 2 torch threads) in one process, as `compare` serves it, with an ingress whose
encoder reads the scheduler's run time (`/proc/PID/task/TID/schedstat`, ns) of a set of threads right before
and after each forward pass. One client runs for 10 s first; every thread on the machine that ran more than
5 ms in that window is watched during the next 15 s. Per thread: CPU during the passes (per pass) and in the
whole window (per request). On two cores, whatever runs during a pass preempts one of torch's two threads,
and the other then waits for it at the next barrier (BENCHMARKS.md, "Where the c=1 pass loses its time").
The snapshot reads add ~2-4 ms per request outside the passes, so the client's rate here is not the service's.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serve_app.bench.experiments import build_app_with
from serve_app.bench.experiments.pass_timing import SERVED_ONE_PROCESS
from serve_app.encoder import ClipEncoder
from serve_app.ingress import OpenAIIngress as _IngressDeployment

WATCH_ENV, OUT_ENV = "PASS_NEIGHBOURS_WATCH", "PASS_NEIGHBOURS_OUT"
_forward_isolated = ClipEncoder.func_or_class._forward_isolated


def _runtimes(paths: list[str]) -> dict[str, int]:
    out = {}
    for path in paths:
        try:
            with open(path) as f:
                out[path] = int(f.read().split()[0])
        except OSError:  # the thread ended
            pass
    return out


def _probed_forward(self: Any, items: list[Any], forward: Any) -> Any:
    """The encoder's own `_forward_isolated`, between two schedstat snapshots of the watched threads."""
    watch = os.environ.get(WATCH_ENV, "")
    if not os.path.exists(watch):
        return _forward_isolated(self, items, forward)
    paths = Path(watch).read_text().split()
    before, started = _runtimes(paths), time.perf_counter()
    try:
        return _forward_isolated(self, items, forward)
    finally:
        wall_ns = int((time.perf_counter() - started) * 1e9)
        after = _runtimes(paths)
        totals = self.__dict__.setdefault("_neighbours", {"passes": 0, "wall_ns": 0, "ran_ns": {}})
        totals["passes"] += 1
        totals["wall_ns"] += wall_ns
        for path in after.keys() & before.keys():
            totals["ran_ns"][path] = totals["ran_ns"].get(path, 0) + after[path] - before[path]
        if totals["passes"] % 10 == 0:
            out = os.environ[OUT_ENV]
            Path(out + ".tmp").write_text(json.dumps(totals))
            os.replace(out + ".tmp", out)


class ProbedIngress(_IngressDeployment.func_or_class):
    """The service's ingress, whose in-process encoders run the probed forward pass."""

    async def __init__(self, *args: Any, **kwargs: Any) -> None:  # Serve's ingress wrapper has an async __init__
        ClipEncoder.func_or_class._forward_isolated = _probed_forward  # this replica's process only
        await super().__init__(*args, **kwargs)


def build_app(args: Any) -> Any:
    return build_app_with(args, "OpenAIIngress", ProbedIngress)


def _all_threads() -> dict[str, int]:
    return _runtimes([str(p) for p in Path("/proc").glob("[0-9]*/task/[0-9]*/schedstat")])


def _label(path: str) -> str:
    pid, tid = path.split("/")[2], path.split("/")[4]
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        thread = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        words, thread = ["?"], "?"
    script = next((w.rsplit("/", 1)[-1] for w in words[1:] if w.endswith(".py")), None)  # python .../x.py
    command = script or " ".join(w.rsplit("/", 1)[-1] if i == 0 else w for i, w in enumerate(words))
    return f"{pid}/{tid} {thread:<16} {command[:50]}"


def main(argv: list[str]) -> int:
    from serve_app.bench.loadgen import Level, LoadSettings, run_load
    from serve_app.bench.payloads import ImagePayload, TextPayload
    from serve_app.bench.servers import OurServer

    payload = (ImagePayload(model="bench", distinct=32) if "--images" in argv
               else TextPayload(model="bench", distinct=128)).prepare()
    work = Path(tempfile.mkdtemp(prefix="pass-neighbours-"))
    watch, out = work / "watch", work / "out.json"
    server = OurServer(work / "server", SERVED_ONE_PROCESS,
                       import_path="serve_app.bench.experiments.pass_neighbours:build_app",
                       env={WATCH_ENV: str(watch), OUT_ENV: str(out)})
    one_client = [Level(concurrency=1)]
    with server:
        server.wait_ready(payload, 300)
        run_load(server.base_url, payload, one_client, LoadSettings(duration_s=4, warmup_s=1, progress=False))
        before = _all_threads()
        run_load(server.base_url, payload, one_client, LoadSettings(duration_s=10, warmup_s=0.01, progress=False))
        after = _all_threads()
        busy = sorted(p for p in after.keys() & before.keys() if after[p] - before[p] > 5_000_000)
        watch.write_text("\n".join(busy))
        before = _all_threads()
        (result,) = run_load(server.base_url, payload, one_client,
                             LoadSettings(duration_s=15, warmup_s=0.5, progress=False))
        after = _all_threads()
        time.sleep(1)
        totals = json.loads(out.read_text())
        labels = {path: _label(path) for path in totals["ran_ns"]}
    passes = totals["passes"]
    print(f"one client: {result.items_per_s:.2f}/s (p50 {result.latency_ms['p50']:.1f} ms); {len(busy)} threads "
          f"watched; {passes} passes, mean {totals['wall_ns'] / passes / 1e6:.2f} ms")
    rows = sorted(((ns / passes / 1e6, (after.get(p, 0) - before.get(p, 0)) / max(result.ok, 1) / 1e6, labels[p])
                   for p, ns in totals["ran_ns"].items()), reverse=True)
    for during, whole, label in rows:
        if whole >= 0.05:
            print(f"  {during:6.2f} ms per pass during passes, {whole:6.2f} ms per request in all   {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
