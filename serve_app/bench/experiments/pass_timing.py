"""EXPERIMENT: is a batch-1 image pass slower outside the bare loop? (BENCHMARKS.md, the c=1 lead)

    python -m serve_app.bench.experiments.pass_timing            # driver, thread pool, Ray task, nice 15
    python -m serve_app.bench.experiments.pass_timing --gaps     # idle gaps between passes, as the hops leave
    python -m serve_app.bench.experiments.pass_timing --replica  # inside an idle Serve replica (production env)
    python -m serve_app.bench.experiments.pass_timing --cluster  # beside the idle service: running vs frozen
    python -m serve_app.bench.experiments.pass_timing --threads  # beside the idle service: 1 vs 2 torch threads
    python -m serve_app.bench.experiments.pass_timing --sched-batch  # beside it: its threads SCHED_OTHER vs BATCH

The same `EncoderCore.encode_images` (ViT-B-32, random weights, 2 threads) the served encoder runs, p50 of
40 passes after 5 warm-up passes.
"""

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


# The service beside the passes: the same model, as `serve run` with production settings serves it.
SERVED = {"model": "ViT-B-32", "pretrained": "random", "served_model_name": "bench", "torch_threads": 2}
SERVED_ONE_PROCESS = {**SERVED, "layout": "one-process"}


def _core():
    from serve_app.config import ModelSpec
    from serve_app.encoder import EncoderCore

    return EncoderCore(ModelSpec(model="ViT-B-32", pretrained="random", device="cpu", torch_threads=2))


def _switches() -> tuple[int, int]:
    """(voluntary, involuntary) context switches of the calling thread so far."""
    with open("/proc/thread-self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"])


def _p50_ms(core, gap_s: float = 0.0, passes: int = 40, switches: dict | None = None, kind: str = "image") -> float:
    """p50 of `passes` batch-1 passes of a 224x224 image, or with `kind="text"` of a short caption (the load
    generator's kind of text); `switches` (if given) gets the calling thread's context switches per pass,
    voluntary and involuntary."""
    import torch

    if kind == "text":
        import open_clip

        one = open_clip.get_tokenizer("ViT-B-32")(["a photo of a small brown dog on a sofa"])
        encode = core.encode_texts
    else:
        one = torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8)
        encode = core.encode_images
    for _ in range(5):
        encode(one)
    times = []
    before = _switches()
    for _ in range(passes):
        if gap_s:
            time.sleep(gap_s)
        started = time.perf_counter()
        encode(one)
        times.append((time.perf_counter() - started) * 1000)
    after = _switches()
    if switches is not None:
        switches["voluntary"] = round((after[0] - before[0]) / passes, 1)
        switches["involuntary"] = round((after[1] - before[1]) / passes, 1)
    return round(statistics.median(times), 1)


def where(nice: int | None = None) -> dict:
    """p50 in this process's main thread and in a one-thread pool (the served encoder's forward thread)."""
    if nice is not None:
        os.nice(nice)
    core = _core()
    return {"nice": os.nice(0), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "main_ms": _p50_ms(core), "thread_pool_ms": ThreadPoolExecutor(1).submit(_p50_ms, core).result()}


def _with_switches(core) -> str:
    switches: dict = {}
    ms = _p50_ms(core, switches=switches)
    return f"{ms} ms ({switches['voluntary']} voluntary, {switches['involuntary']} involuntary switches/pass)"


def replica() -> None:
    """The same passes inside an idle Serve replica started like the service (deploy/ray-serve.env)."""
    from serve_app.ray_env import use_one_machine_env

    use_one_machine_env()
    import asyncio

    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 1})
    class PassTimer:
        def __init__(self) -> None:
            self.core = _core()
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="forward")

        async def measure(self) -> dict:
            loop = asyncio.get_running_loop()
            return {
                "forward_thread": await loop.run_in_executor(self.pool, _with_switches, self.core),
                "event_loop_blocked": _with_switches(self.core),
            }

    serve.run(PassTimer.bind(), name="pass-timing", route_prefix=None)
    handle = serve.get_deployment_handle("PassTimer", app_name="pass-timing")
    handle._init(_run_router_in_separate_loop=True)
    try:
        print("driver        forward thread", ThreadPoolExecutor(1).submit(_with_switches, _core()).result())
        for key, value in handle.measure.remote().result().items():
            print(f"Serve replica {key:<14}", value)
    finally:
        serve.shutdown()


def cluster(rounds: int = 4) -> None:
    """Passes in this process beside the whole service (`serve run`, ViT-B-32, production env) while it
    idles, alternating with the same service frozen (SIGSTOP to every process of its session): what the
    service's own background costs a forward pass sharing its cores."""
    import signal
    import tempfile
    from pathlib import Path

    from serve_app.bench.payloads import make_payload
    from serve_app.bench.servers import OurServer

    core = _core()
    with OurServer(Path(tempfile.mkdtemp(prefix="pass-timing-")), SERVED) as server:
        server.wait_ready(make_payload("text", model="bench"), 300)
        time.sleep(5)  # start-up work settles
        members = server.session_pids()
        print(f"service up: {len(members)} processes")
        for _ in range(rounds):
            print("service running", _with_switches(core), flush=True)
            for pid in members:
                os.kill(pid, signal.SIGSTOP)
            try:
                print("service frozen ", _with_switches(core), flush=True)
            finally:
                for pid in members:
                    os.kill(pid, signal.SIGCONT)


def sched_batch(rounds: int = 3) -> None:
    """Passes in this process (SCHED_OTHER) beside the idle one-process service, alternating its threads between
    SCHED_OTHER (as Ray starts them) and SCHED_BATCH: a batch thread that wakes does not preempt a running one
    (the kernel's wake-up preemption skips it), so are the service's wake-ups what preempts the passes?"""
    import tempfile
    from pathlib import Path

    from serve_app.bench.payloads import make_payload
    from serve_app.bench.servers import OurServer

    def set_policy(pids: list[int], policy: int) -> int:
        changed = 0
        for pid in pids:
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    os.sched_setscheduler(int(task.name), policy, os.sched_param(0))
                    changed += 1
                except OSError:  # a thread that just ended
                    pass
        return changed

    core = _core()
    with OurServer(Path(tempfile.mkdtemp(prefix="pass-timing-")), SERVED_ONE_PROCESS) as server:
        server.wait_ready(make_payload("text", model="bench"), 300)
        time.sleep(5)  # start-up work settles
        members = server.session_pids()
        for round_ in range(rounds):
            for name, policy in (("other", os.SCHED_OTHER), ("batch", os.SCHED_BATCH)):
                changed = set_policy(members, policy)
                text, image = {}, {}
                text_ms, image_ms = _p50_ms(core, kind="text", switches=text), _p50_ms(core, passes=20, switches=image)
                print(f"round {round_} service {name} ({changed} threads): text p50 {text_ms} ms "
                      f"({text['involuntary']} involuntary switches/pass), image p50 {image_ms} ms "
                      f"({image['involuntary']})", flush=True)


def threads(rounds: int = 4) -> None:
    """Batch-1 passes on one torch thread against two, in this process beside the whole idle service and
    alone (the service stopped): does a single thread escape the wait at OpenMP barriers that the
    service's wake-ups cause (see --cluster)?"""
    import tempfile
    from pathlib import Path

    import torch

    from serve_app.bench.payloads import make_payload
    from serve_app.bench.servers import OurServer

    core = _core()

    def one_round(label: str) -> None:
        for kind in ("text", "image"):
            for n in (2, 1):
                torch.set_num_threads(n)
                print(f"{label:<15} {kind:<5} {n} thread(s): p50 {_p50_ms(core, kind=kind)} ms", flush=True)
        torch.set_num_threads(2)

    with OurServer(Path(tempfile.mkdtemp(prefix="pass-timing-")), SERVED_ONE_PROCESS) as server:
        server.wait_ready(make_payload("text", model="bench"), 300)
        time.sleep(5)  # start-up work settles
        for _ in range(rounds):
            one_round("service idle")
    for _ in range(rounds):
        one_round("service stopped")


def main(argv: list[str]) -> int:
    if "--threads" in argv:
        threads()
        return 0
    if "--cluster" in argv:
        cluster()
        return 0
    if "--sched-batch" in argv:
        sched_batch()
        return 0
    if "--replica" in argv:
        replica()
        return 0
    if "--gaps" in argv:
        core = _core()
        for gap in (0.0, 0.01, 0.04, 0.0, 0.04):
            print(f"gap {gap * 1000:4.0f} ms: pass p50 {_p50_ms(core, gap)} ms")
        return 0
    print("driver       ", where())
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        print("Ray task     ", ray.get(ray.remote(num_cpus=1)(where).remote()))
    finally:
        ray.shutdown()
    print("driver nice15", where(nice=15))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
