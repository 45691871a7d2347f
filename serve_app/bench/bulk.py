"""`clip-bench bulk`: the Batch API (/v1/files, /v1/batches) against the bare model, the online path beside a
running batch, and the batch job's memory by file size, in one run.

    clip-bench bulk --model ViT-B-32 --pretrained random --images 128 --texts 1024 --lines 10000,50000
    clip-bench bulk --tiny --images 32 --texts 256 --lines 1000,3000 --window 5      # a smoke run

The bare model (serve_app/bench/bare.py: the service's own preprocessing and `EncoderCore`, in this process, at
the job's batch size, on the same JPEGs and captions the batch files carry) and our service (`serve run`, the
one-process layout, the Batch API on, files and records in the work directory), then three parts (`--parts`):

- throughput: a few-line warm-up batch (the runner's first imports, Ray Data's own actors), then a file of
  `--images` lines (one 640x480 JPEG each, a data URI) and one of `--texts` lines (one caption each), each run as a
  batch alone, between two bare measurements of its modality (the service idle meanwhile: on a shared machine the
  load drifts within minutes). Timed from the batch's creation to `completed` as this client polls it (every
  1 s), and by the job's own `in_progress_at` -> `completed_at` (whole seconds); the polls and the processes'
  titles (sampled from /proc) tell where the time went: validation (created -> in_progress), the stages' start
  (worker processes, imports, the model's load: the actors' `__init__`), the first results, the steady rate after
  them; and the CPU seconds of each process. Each rate / bare's.
- priority: the online /v1/embeddings p50/p99 at a fixed load (`--rate` requests/s, an open loop; or a closed loop
  of `--concurrency` clients) of single-image or single-text requests for `--window` seconds without a batch, then
  with an image batch running (started and producing results before the window, sized from the throughput part's
  rate to outlast it; cancelled after); `--rounds` such pairs, the goal judged on the median of their ratios. A
  round starts once the last round's stages are gone (a cancel lets them go after the row group in hand).
  The job's stages run `--niceness` above the niceness Ray starts every worker at (its `worker_niceness`, 15 by
  default, capped at 19; `--worker-niceness` sets Ray's), under SCHED_IDLE with `--idle`, with a fixed number
  of preprocessing actors. The niceness each process was seen at is reported.
- memory: text files of `--lines` lines each; while each runs, the RSS of the BatchRunner replica and of every
  process of the job (Ray Data's actors and the Ray workers running its read tasks) is sampled every
  `--sample-s` seconds from /proc; the peaks and their ratio across file sizes (flat: the job streams).

Logical CPUs: the job's actors hold their Ray CPUs for the whole job; on a small machine the service's and the
job's reservations would not fit Ray's count of the cores, so the server's Ray is told of at least
`reserved + 1` CPUs (RAY_OVERRIDE_RESOURCES; threads and cores are unchanged).
"""

import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PARTS = ("throughput", "priority", "memory")
TERMINAL = ("completed", "failed", "cancelled", "expired")
GOALS = {"throughput_ratio_min": 0.9, "p99_ratio_max": 1.5, "memory_ratio_max": 1.2}
POLL_S = 1.0  # as a client polls a batch (the SDK's examples poll every few seconds); each poll costs CPU
RUNNER_MARK = "BatchRunner"
# Ray's process titles: `ray::MapWorker(MapBatches(LinePreprocess))` for the stages' actors (`.__init__` while
# their constructor runs, `.submit` while they work), `ray::ListFiles`, `ray::ReadFilesParquetV2` for a pooled worker
# while it runs one of the job's tasks, `ray::IDLE` otherwise. Ray Data's own actors (`_StatsActor`,
# `_AutoscalingCoordinatorActor`, `ActorLocationTracker`) start with the first job and outlive it: counted with
# the job. Ray's and Serve's own processes are not.
NOT_JOB = ("ServeReplica:", "ServeController", "ProxyActor", "IDLE", "DashboardAgent", "RuntimeEnvAgent",
           "HAProxyManager", "dashboard")


@dataclass
class BulkSettings:
    model: str | None = "ViT-B-32"  # None: the tiny random model of serve_app.dev_model
    pretrained: str | None = "random"
    threads: int = 2
    images: int = 64  # lines of the throughput part's image file (one image each)
    texts: int = 512  # lines of its text file (one caption each)
    width: int = 640
    height: int = 480
    jpeg_quality: int = 85
    distinct: int = 64  # distinct images and captions cycled through (bare's own pool)
    lines: list[int] = field(default_factory=lambda: [10_000, 50_000])
    window_s: float = 20.0
    warmup_s: float = 2.0
    concurrency: int = 2
    rate: float | None = None  # priority: online requests/s, an open loop (None: `concurrency` clients, closed)
    rounds: int = 1  # priority: rounds of without / with a batch
    online_payload: str = "image"  # image | text
    niceness: int = 10
    idle: bool = False  # the stages under SCHED_IDLE
    worker_niceness: int | None = None  # RAY_worker_niceness of the server's Ray (None: Ray's default, 15)
    preprocess_concurrency: int = 1
    batch_size: int = 32  # the job's encoder batch and bare's batch size
    encoding_format: str = "float"
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    sample_s: float = 0.2
    bare_min_seconds: float = 3.0
    job_timeout_s: float = 900.0
    priority_max_lines: int = 5000  # the priority batch's image lines at most (its file is ~55 kB a line)
    app_args: dict[str, Any] = field(default_factory=dict)
    workdir: str = "/tmp/clip-bench-bulk"


# ------------------------------------------------------------------ the batch files


def request_line(custom_id: str, model: str, kind: str, value: str,
                 encoding_format: str = "float") -> dict[str, Any]:
    """One Batch API request line: a /v1/embeddings body of one image (a data URI) or one text."""
    item: Any = {"type": "image_url", "image_url": {"url": value}} if kind == "image" else value
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": model, "input": [item], "encoding_format": encoding_format}}


def write_requests(path: str | Path, model: str, kind: str, values: Iterable[str], prefix: str = "r",
                   encoding_format: str = "float") -> dict[str, int]:
    """A JSONL batch input file, one request per value (custom ids `prefix-0`, `prefix-1`, ...); its lines and
    bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = size = 0
    with open(path, "wb") as out:
        for i, value in enumerate(values):
            data = (json.dumps(request_line(f"{prefix}-{i}", model, kind, value, encoding_format),
                               separators=(",", ":")) + "\n").encode()
            out.write(data)
            lines += 1
            size += len(data)
    return {"lines": lines, "bytes": size}


def cycle(pool: list[str], count: int) -> Iterable[str]:
    return (pool[i % len(pool)] for i in range(count))


# ------------------------------------------------------------------ the Batch API client


class BatchClient:
    """/v1/files and /v1/batches over httpx (what the openai SDK sends; the bench does not need the SDK)."""

    def __init__(self, base_url: str, timeout_s: float = 900.0) -> None:
        import httpx

        self.base = base_url.rstrip("/") + "/v1"
        self.http = httpx.Client(timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def _ok(self, response: Any) -> dict[str, Any]:
        if response.status_code >= 400:
            raise RuntimeError(f"{response.request.method} {response.request.url}: HTTP {response.status_code}: "
                               f"{response.text[:500]}")
        return response.json()

    def upload(self, path: Path) -> dict[str, Any]:
        with open(path, "rb") as source:
            return self._ok(self.http.post(f"{self.base}/files", data={"purpose": "batch"},
                                           files={"file": (path.name, source, "application/jsonl")}))

    def delete_file(self, file_id: str | None) -> None:
        if file_id:
            self.http.delete(f"{self.base}/files/{file_id}")

    def create(self, file_id: str) -> dict[str, Any]:
        return self._ok(self.http.post(f"{self.base}/batches", json={
            "input_file_id": file_id, "endpoint": "/v1/embeddings", "completion_window": "24h"}))

    def get(self, batch_id: str) -> dict[str, Any]:
        return self._ok(self.http.get(f"{self.base}/batches/{batch_id}"))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        return self._ok(self.http.post(f"{self.base}/batches/{batch_id}/cancel"))

    def poll(self, batch_id: str, started: float, until: Any, timeout_s: float,
             polls: list[dict[str, Any]]) -> dict[str, Any]:
        """Polls every POLL_S until `until(batch)`; each poll appended to `polls` as (t since `started`, status,
        completed, failed)."""
        deadline = time.perf_counter() + timeout_s
        while True:
            batch = self.get(batch_id)
            counts = batch.get("request_counts") or {}
            polls.append({"t": round(time.perf_counter() - started, 3), "status": batch["status"],
                          "completed": counts.get("completed", 0), "failed": counts.get("failed", 0)})
            if until(batch) or batch["status"] in TERMINAL:
                return batch
            if time.perf_counter() > deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout_s:.0f}s")
            time.sleep(POLL_S)


# ------------------------------------------------------------------ pure computations


def batch_timing(polls: list[dict[str, Any]], batch: dict[str, Any], items: int) -> dict[str, Any]:
    """Where a batch's time went, from the client's polls (t: seconds since creation) and its own timestamps."""
    def first(pred: Any) -> dict[str, Any] | None:
        return next((p for p in polls if pred(p)), None)

    done = first(lambda p: p["status"] in TERMINAL)
    running = first(lambda p: p["status"] not in ("validating",))
    producing = first(lambda p: p["completed"] + p["failed"] > 0)
    # the last poll still in progress: the steady rate runs from the first results to it
    last = next((p for p in reversed(polls) if p["status"] == "in_progress"), None)
    wall = done["t"] if done else None
    steady = None
    if producing and last and last["t"] > producing["t"]:
        count = (last["completed"] + last["failed"]) - (producing["completed"] + producing["failed"])
        if count > 0:
            steady = count / (last["t"] - producing["t"])
    job_s = None
    if batch.get("in_progress_at") and batch.get("completed_at"):
        job_s = batch["completed_at"] - batch["in_progress_at"]
    return {
        "items": items,
        "status": batch["status"],
        "completed": (batch.get("request_counts") or {}).get("completed"),
        "failed": (batch.get("request_counts") or {}).get("failed"),
        "wall_s": wall,
        "items_per_s": items / wall if wall else None,
        "job_s": job_s,  # whole seconds: in_progress_at -> completed_at
        "job_items_per_s": items / job_s if job_s else None,
        "validating_s": running["t"] if running else None,
        "first_result_s": producing["t"] if producing else None,
        "stages_start_s": producing["t"] - running["t"] if producing and running else None,
        "steady_items_per_s": steady,
        "tail_s": wall - last["t"] if wall is not None and last else None,
        "polls": len(polls),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def bare_rates(runs: list[dict[str, Any]], batch: int) -> dict[str, float | None]:
    """Images/s and texts/s at `batch`, the mean over the bare runs (the ones just before and after a batch)."""
    out: dict[str, float | None] = {}
    for modality in ("image", "text"):
        rates = [r["items_per_s"] for run in runs for r in run["results"]
                 if r["modality"] == modality and r["batch"] == batch]
        out[modality] = sum(rates) / len(rates) if rates else None
    return out


def throughput_summary(jobs: dict[str, dict[str, Any]], bare: dict[str, float | None]) -> dict[str, Any]:
    """Per modality: the batch's rate (wall, job's own, steady) over bare's."""
    out = {}
    for kind, job in jobs.items():
        rate = bare.get(kind)
        out[kind] = {"bare_items_per_s": rate, "wall_over_bare": ratio(job["items_per_s"], rate),
                     "job_over_bare": ratio(job["job_items_per_s"], rate),
                     "steady_over_bare": ratio(job["steady_items_per_s"], rate)}
    return out


def priority_summary(without: dict[str, Any], with_batch: dict[str, Any]) -> dict[str, Any]:
    lat_a, lat_b = without["latency_ms"], with_batch["latency_ms"]
    return {"p50_without_ms": lat_a.get("p50"), "p50_with_ms": lat_b.get("p50"),
            "p99_without_ms": lat_a.get("p99"), "p99_with_ms": lat_b.get("p99"),
            "p50_ratio": ratio(lat_b.get("p50"), lat_a.get("p50")),
            "p99_ratio": ratio(lat_b.get("p99"), lat_a.get("p99")),
            "requests_per_s_ratio": ratio(with_batch.get("requests_per_s"), without.get("requests_per_s"))}


def rounds_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' ratios and their median (the goal is judged on the median: one round's p99 is a handful of
    requests)."""
    import statistics

    out: dict[str, Any] = {}
    for key in ("p50_ratio", "p99_ratio", "requests_per_s_ratio"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key + "s"] = values
        out[key] = round(statistics.median(values), 3) if values else None
    return out


def priority_lines(rate: float | None, window_s: float, warmup_s: float, cap: int, floor: int = 64) -> int:
    """Image lines a batch needs to outlast the window at `rate` (its rate alone; beside the online load it is
    slower): 1.5x the lines of window + warm-up + 10 s, within [floor, cap]."""
    if not rate:
        return cap
    return max(floor, min(cap, math.ceil(1.5 * rate * (window_s + warmup_s + 10.0))))


def process_title(cmd: str) -> str:
    """A process's title without the method it is running (`ray::MapWorker(...).submit` -> `ray::MapWorker(...)`);
    a program's name for the others (`raylet`, `gcs_server`, `python`)."""
    title = cmd.split()[0] if cmd.split() else "?"  # no command line: a zombie, a kernel thread
    if not title.startswith("ray::"):
        return os.path.basename(title)[:80]
    return re.sub(r"\)?\.[A-Za-z_]\w*$", lambda m: ")" if m.group(0).startswith(")") else "", title)[:80]


def process_role(cmd: str) -> str | None:
    """'runner' for the BatchRunner replica, 'job' for a process of a running job (a stage's actor, a worker
    running one of its tasks), None for anything else (Ray's own processes, other replicas, idle workers)."""
    if RUNNER_MARK in cmd and "ServeReplica:" in cmd:
        return "runner"
    if cmd.startswith("ray::") and not any(mark in cmd for mark in NOT_JOB):
        return "job"
    return None


class Peaks:
    """Over samples of (pid, cmd, rss bytes, cpu seconds) of a service's processes: the peak RSS of the runner, of
    the job's processes together and of each job process title; when each job process title (with the method it
    ran: `.__init__`, `.submit`) first showed in a process that did not have it at the first sample; and the CPU
    seconds each title took between the first sample and the last (a process that started meanwhile: all its CPU)."""

    def __init__(self) -> None:
        self.runner = 0
        self.job = 0  # the job's processes' RSS summed, at the sample where that sum was largest
        self.total = 0  # runner + job, at one sample
        self.by_title: dict[str, int] = {}
        self.first_seen: dict[str, float] = {}
        self.cpu_by_title: dict[str, float] = {}
        self.niceness: dict[str, int] = {}  # titles seen at a niceness above 0 (filled by the sampler)
        self.samples = 0
        self.job_pids: set[int] = set()
        self._initial: dict[int, str] | None = None  # pid -> cmd at the first sample
        self._cpu: dict[int, float] = {}  # pid -> its CPU seconds at its last sample

    def add(self, sample: list[tuple[int, str, int, float]], t: float | None = None) -> None:
        first = self._initial is None
        if first:
            self._initial = {pid: cmd for pid, cmd, _, _ in sample}
        runner = job = 0
        for pid, cmd, rss, cpu in sample:
            title = process_title(cmd)
            if not first:  # CPU since the last sample, or since its start for a process new since the first
                self.cpu_by_title[title] = self.cpu_by_title.get(title, 0.0) + cpu - self._cpu.get(pid, 0.0)
            self._cpu[pid] = cpu
            role = process_role(cmd)
            if role == "runner":
                runner = max(runner, rss)
            elif role == "job":
                job += rss
                self.job_pids.add(pid)
                self.by_title[title] = max(self.by_title.get(title, 0), rss)
                if t is not None and self._initial.get(pid) != cmd:
                    self.first_seen.setdefault((cmd.split() or [cmd])[0][:100], round(t, 2))
        self.runner = max(self.runner, runner)
        self.job = max(self.job, job)
        self.total = max(self.total, runner + job)
        self.samples += 1

    def to_dict(self) -> dict[str, Any]:
        mib = lambda b: round(b / 2**20, 1)  # noqa: E731
        return {"runner_peak_mib": mib(self.runner), "job_processes_peak_mib": mib(self.job),
                "runner_plus_job_peak_mib": mib(self.total), "job_processes": len(self.job_pids),
                "by_title_peak_mib": {k: mib(v) for k, v in sorted(self.by_title.items())},
                "first_seen_s": dict(sorted(self.first_seen.items(), key=lambda kv: kv[1])),
                "cpu_s_by_title": {k: round(v, 2) for k, v in sorted(self.cpu_by_title.items(), key=lambda kv: -kv[1])
                                   if v >= 0.005},
                "niceness_by_title": dict(sorted(self.niceness.items())),
                "samples": self.samples}


def stage_timeline(first_seen: dict[str, float]) -> dict[str, float | None]:
    """Seconds since a batch's creation when its processes were first seen: its read tasks, each stage's actors
    in their constructor (a worker process, the imports, the model's load) and at work."""
    def first(match: Any) -> float | None:
        times = [t for title, t in first_seen.items() if match(title)]
        return min(times) if times else None

    def stage(name: str, init: bool) -> Any:
        return lambda title: "MapWorker" in title and name in title and ("__init__" in title) == init

    return {"read": first(lambda title: "ListFiles" in title or "Read" in title),
            "preprocess_init": first(stage("Preprocess", True)), "encode_init": first(stage("Encode", True)),
            "preprocess_working": first(stage("Preprocess", False)), "encode_working": first(stage("Encode", False))}


def memory_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest file's peaks over the smallest's."""
    if len(rows) < 2:
        return {}
    small, large = min(rows, key=lambda r: r["lines"]), max(rows, key=lambda r: r["lines"])
    return {"lines": [small["lines"], large["lines"]],
            "runner_peak_ratio": ratio(large["runner_peak_mib"], small["runner_peak_mib"]),
            "runner_growth_mib": [small.get("runner_growth_mib"), large.get("runner_growth_mib")],
            "job_processes_peak_ratio": ratio(large["job_processes_peak_mib"], small["job_processes_peak_mib"]),
            "total_peak_ratio": ratio(large["runner_plus_job_peak_mib"], small["runner_plus_job_peak_mib"])}


def goals(report: dict[str, Any]) -> dict[str, Any]:
    """Each goal of the issue: the number it is judged on and whether it holds (None: not measured)."""
    out: dict[str, Any] = {}
    tp = report.get("throughput", {}).get("summary", {})
    for kind in ("image", "text"):
        value = tp.get(kind, {}).get("wall_over_bare")
        out[f"{kind}_throughput_over_bare"] = {"value": value, "goal": f">= {GOALS['throughput_ratio_min']}",
                                               "met": None if value is None else value >= GOALS["throughput_ratio_min"]}
    p99 = report.get("priority", {}).get("summary", {}).get("p99_ratio")
    out["online_p99_with_over_without"] = {"value": p99, "goal": f"<= {GOALS['p99_ratio_max']}",
                                           "met": None if p99 is None else p99 <= GOALS["p99_ratio_max"]}
    mem = report.get("memory", {}).get("summary", {}).get("total_peak_ratio")
    out["memory_peak_large_over_small"] = {"value": mem, "goal": f"<= {GOALS['memory_ratio_max']} (flat)",
                                           "met": None if mem is None else mem <= GOALS["memory_ratio_max"]}
    return out


# ------------------------------------------------------------------ sampling the processes' RSS


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_stat(pid: int) -> tuple[float, int] | None:
    """(user + system CPU seconds, niceness) of one process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[16])


class RssSampler:
    """Samples the RSS of every process under `root_pid` every `interval_s` into `Peaks`, in a thread."""

    def __init__(self, root_pid: int, interval_s: float = 0.2, t0: float | None = None) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.t0 = time.perf_counter() if t0 is None else t0  # first-seen times are since this
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bulk-rss", daemon=True)

    def sample(self) -> list[tuple[int, str, int, float]]:
        from serve_app.bench.report import process_rss, process_tree

        rows = []
        for pid in process_tree(self.root_pid):
            info = process_rss(pid)
            stat = process_stat(pid)
            if info is not None and stat is not None:
                rows.append((pid, info[0], info[1], stat[0]))
                if stat[1]:  # the job's stages run niced: seen here
                    title = process_title(info[0])
                    self.peaks.niceness[title] = max(self.peaks.niceness.get(title, 0), stat[1])
        return rows

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = self.sample()
            self.peaks.add(sample, time.perf_counter() - self.t0)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def runner_rss_mib(root_pid: int) -> float | None:
    from serve_app.bench.report import process_rss, process_tree

    for pid in process_tree(root_pid):
        info = process_rss(pid)
        if info is not None and process_role(info[0]) == "runner":
            return round(info[1] / 2**20, 1)
    return None


# ------------------------------------------------------------------ the run


def app_args(settings: BulkSettings, model: str, pretrained: str | None, workdir: Path) -> dict[str, Any]:
    from serve_app.bench.compare import CompareSettings, merge_args, one_process_app_args

    args = one_process_app_args(CompareSettings(model=model, pretrained=pretrained, threads=settings.threads))
    biggest = max([*settings.lines, settings.images, settings.texts, settings.priority_max_lines, 50_000])
    args = merge_args(args, {
        "encoder": {"num_cpus": 0.5},
        "tenancy": {"database_url": f"sqlite+aiosqlite:///{workdir / 'records.sqlite'}"},
        "batch": {"enabled": True, "storage": str(workdir / "store"), "poll_interval_s": 0.5,
                  "max_file_bytes": 1 << 30, "max_requests_per_file": biggest, "max_inputs_per_batch": biggest,
                  # the job's encoder gets bare's threads (its torch threads follow encoder_cpus)
                  "job": {"batch_size": settings.batch_size, "concurrency": 1, "encoder_cpus": settings.threads,
                          "preprocess_concurrency": settings.preprocess_concurrency, "preprocess_cpus": 0.25,
                          "niceness": settings.niceness, "idle": settings.idle}},
    })
    return merge_args(args, settings.app_args)


def reserved_cpus(args: dict[str, Any]) -> float:
    """Ray CPUs the service and one job hold: the encoder pool, the runner, the stages' actors, a read task."""
    from serve_app.config import AppArgs

    app = AppArgs.model_validate(args)
    encoder = sum((s.encoder.num_cpus or 1.0) * (s.encoder.num_replicas if isinstance(s.encoder.num_replicas, int)
                                                 else 1) for s in app.model_specs())
    job = app.batch.job
    return (encoder + (app.batch.runner.num_cpus or 0) + (job.preprocess_concurrency or 1) * job.preprocess_cpus
            + job.concurrency * job.encoder_cpus + 0.25)


def _bare(settings: BulkSettings, model: str, pretrained: str | None) -> Any:
    """The bare model (bare.py), loaded in this process; measured per modality beside the idle service."""
    from serve_app.bench.bare import BareModel, BareSettings, model_spec

    return BareModel(model_spec(model, pretrained, settings.threads),
                     BareSettings(image_batches=[settings.batch_size], text_batches=[settings.batch_size],
                                  min_seconds=settings.bare_min_seconds, width=settings.width,
                                  height=settings.height, jpeg_quality=settings.jpeg_quality,
                                  distinct=settings.distinct))


def measure_bare(bare: Any, kind: str, batch: int) -> dict[str, Any]:
    """One bare measurement of `kind` at `batch`, in the shape of bare.py's runs (`bare_rates` reads it)."""
    from serve_app.bench.report import loadavg

    before = loadavg()
    result = bare.measure_images(batch) if kind == "image" else bare.measure_texts(batch)
    return {"results": [result], "loadavg_before": before, "loadavg_after": loadavg(), "at": time.time()}


def _run_batch(client: BatchClient, path: Path, lines: int, timeout_s: float, root_pid: int | None = None,
               sample_s: float = 0.2) -> tuple[dict[str, Any], dict[str, Any]]:
    """Uploads `path`, runs it as a batch to its end; (timing, extras). With `root_pid`: RSS peaks sampled."""
    import contextlib

    upload_started = time.perf_counter()
    uploaded = client.upload(path)
    upload_s = time.perf_counter() - upload_started
    polls: list[dict[str, Any]] = []
    started = time.perf_counter()  # polls' and first-seen times are since the batch's creation
    sampler = RssSampler(root_pid, sample_s, started) if root_pid else None
    with sampler or contextlib.nullcontext():
        batch = client.create(uploaded["id"])
        batch = client.poll(batch["id"], started, lambda b: False, timeout_s, polls)
    timing = batch_timing(polls, batch, lines)
    extras = {"upload_s": round(upload_s, 2), "file_bytes": uploaded.get("bytes"), "batch_id": batch["id"],
              "errors": batch.get("errors")}
    if sampler:
        extras["rss"] = sampler.peaks.to_dict()
    for key in ("input_file_id", "output_file_id", "error_file_id"):
        client.delete_file(batch.get(key))  # outputs of 50k lines of floats are hundreds of MB
    return timing, extras


def run_throughput(settings: BulkSettings, client: BatchClient, served: str, bare: Any, files: Path,
                   root_pid: int | None = None) -> dict[str, Any]:
    """A warm-up batch of a few texts first (the runner's first imports, Ray Data's own actors), then the image
    file and the text file, each alone and each between two bare measurements of its modality (the service idle
    meanwhile: a shared machine's drift falls on both); the service's processes sampled (RSS, CPU, and when each
    job process shows)."""
    jobs, extras, bare_runs = {}, {}, []
    for kind, count, pool in (("warmup", 4, bare.texts), ("image", settings.images, bare.images),
                              ("text", settings.texts, bare.texts)):
        if count <= 0:
            continue
        path = files / f"throughput-{kind}.jsonl"
        write_requests(path, served, "text" if kind == "warmup" else kind, cycle(pool, count), prefix=kind,
                       encoding_format=settings.encoding_format)
        if kind != "warmup":
            bare_runs.append(measure_bare(bare, kind, settings.batch_size))
        timing, extra = _run_batch(client, path, count, settings.job_timeout_s, root_pid=root_pid,
                                   sample_s=settings.sample_s)
        path.unlink()
        if kind == "warmup":
            warmup = {**timing, **extra}
        else:
            bare_runs.append(measure_bare(bare, kind, settings.batch_size))
            jobs[kind], extras[kind] = timing, extra
    rates = bare_rates(bare_runs, settings.batch_size)
    return {"warmup": warmup, "jobs": jobs, "extras": extras, "bare_runs": bare_runs,
            "summary": throughput_summary(jobs, rates)}


def run_priority(settings: BulkSettings, client: BatchClient, server: Any, served: str, bare: Any,
                 image_rate: float | None, files: Path) -> dict[str, Any]:
    """`--rounds` rounds of a window of online load without a batch, then one with an image batch running (the
    batch started before the window and producing, cancelled after it): the machine's drift falls on both sides of
    every round, and each round's ratio is its own."""
    from serve_app.bench.loadgen import Level, LoadSettings, run_load
    from serve_app.bench.payloads import ImagePayload, TextPayload

    if settings.online_payload == "text":
        payload: Any = TextPayload(model=served, distinct=64, seed=11).prepare()
    else:
        payload = ImagePayload(model=served, width=settings.width, height=settings.height,
                               quality=settings.jpeg_quality, distinct=16, seed=20_000).prepare()
    level = [Level(rate=settings.rate) if settings.rate else Level(concurrency=settings.concurrency)]

    cpu: dict[str, Any] = {}
    niceness: dict[str, int] = {}

    def window(name: str) -> dict[str, Any]:
        """One window of online load; every process's CPU during it (the warm-up included) by title."""
        load = LoadSettings(duration_s=settings.window_s, warmup_s=settings.warmup_s, progress=False)
        with RssSampler(server.process.pid, max(settings.sample_s, 0.5)) as sampler:
            (result,) = run_load(server.base_url, payload, level, load)
        seen = sampler.peaks.to_dict()
        cpu[name] = seen["cpu_s_by_title"]
        niceness.update(seen["niceness_by_title"])
        return result.to_dict()

    lines = priority_lines(image_rate, settings.window_s, settings.warmup_s, settings.priority_max_lines)
    path = files / "priority-image.jsonl"
    write_requests(path, served, "image", cycle(bare.images, lines), prefix="p",
                   encoding_format=settings.encoding_format)
    rounds = []
    for number in range(1, settings.rounds + 1):
        without = window(f"without_{number}")
        uploaded = client.upload(path)
        polls: list[dict[str, Any]] = []
        started = time.perf_counter()
        batch = client.create(uploaded["id"])
        batch = client.poll(batch["id"], started,
                            lambda b: b["status"] == "in_progress" and b["request_counts"]["completed"] > 0,
                            settings.job_timeout_s, polls)
        before = batch["request_counts"]["completed"]
        window_started = time.perf_counter()
        with_batch = window(f"with_batch_{number}")
        window_s = time.perf_counter() - window_started
        at_end = client.get(batch["id"])
        covered = at_end["status"] == "in_progress"
        done_in_window = at_end["request_counts"]["completed"] - before
        after = at_end
        if after["status"] not in TERMINAL:
            client.cancel(batch["id"])
            after = client.poll(batch["id"], started, lambda b: False, 300.0, polls)
        for key in ("input_file_id", "output_file_id", "error_file_id"):
            client.delete_file(after.get(key))
        # the next window without a batch starts once the stages are gone (a cancelled batch's stages finish the
        # row group in hand, then stop): else it would measure their tail
        stages_gone = wait_for_no_stages(server.process.pid, 180.0)
        rounds.append({
            "without": without, "with_batch": with_batch, "summary": priority_summary(without, with_batch),
            "stages_gone_s": stages_gone,
            "batch": {"lines": lines, "batch_id": batch["id"], "covered_window": covered,
                      "final_status": after["status"], "started_s": round(window_started - started, 2),
                      "completed_before_window": before,
                      "completed_at_window_end": at_end["request_counts"]["completed"],
                      "images_per_s_during_window": round(done_in_window / window_s, 2) if covered else None},
        })
    path.unlink()
    return {
        "online_payload": payload.describe(), "concurrency": None if settings.rate else settings.concurrency,
        "rate": settings.rate, "window_s": settings.window_s, "niceness": settings.niceness, "idle": settings.idle,
        "preprocess_concurrency": settings.preprocess_concurrency, "rounds": rounds, "cpu_s_by_title": cpu,
        "niceness_seen": {title: n for title, n in niceness.items() if "ServeReplica" in title or "MapWorker" in title},
        "summary": rounds_summary([r["summary"] for r in rounds]),
    }


def wait_for_no_stages(root_pid: int, timeout_s: float) -> float | None:
    """Seconds until no process of a batch's stages (`MapWorker(...)`) is left under `root_pid`; None: still some
    after `timeout_s`."""
    started = time.perf_counter()
    sampler = RssSampler(root_pid)
    while time.perf_counter() - started < timeout_s:
        if not any("MapWorker(" in title for _, title, _, _ in sampler.sample()):
            return round(time.perf_counter() - started, 1)
        time.sleep(0.5)
    return None


def run_memory(settings: BulkSettings, client: BatchClient, server: Any, served: str,
               files: Path) -> dict[str, Any]:
    from serve_app.bench.payloads import short_texts

    rows = []
    for count in settings.lines:
        path = files / f"memory-{count}.jsonl"
        written = write_requests(path, served, "text", short_texts(count, seed=3), prefix="m",
                                 encoding_format=settings.encoding_format)
        before = runner_rss_mib(server.process.pid)
        timing, extras = _run_batch(client, path, count, settings.job_timeout_s, root_pid=server.process.pid,
                                    sample_s=settings.sample_s)
        path.unlink()
        rss = extras.pop("rss")
        rows.append({"lines": count, "file_bytes": written["bytes"], "runner_before_mib": before,
                     "runner_growth_mib": round(rss["runner_peak_mib"] - before, 1) if before else None,
                     **rss, "timing": timing, **extras})
    return {"rows": rows, "summary": memory_summary(rows)}


def run_bulk(settings: BulkSettings) -> dict[str, Any]:
    from serve_app.bench.cpu import serving_path_model
    from serve_app.bench.payloads import TextPayload
    from serve_app.bench.report import git_state, machine_info
    from serve_app.bench.servers import OurServer

    from serve_app.ray_env import small_cpu_env

    # the bare model in this process runs with the OpenMP settings the service's processes get (GOMP_SPINCOUNT:
    # spinning OpenMP workers on a shared 2-core machine slow the model several times); before torch loads
    for key, value in small_cpu_env().items():
        os.environ.setdefault(key, value)
    workdir = Path(settings.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("store", "files", "records.sqlite"):  # this mode's own files of an earlier run
        target = workdir / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    files = workdir / "files"
    files.mkdir()
    model, pretrained = serving_path_model(workdir, settings.model, settings.pretrained)
    report: dict[str, Any] = {"tool": "clip-bench bulk", "settings": asdict(settings), "model": model,
                              "pretrained": pretrained, "machine": machine_info(), "git": git_state()}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    bare = _bare(settings, model, pretrained)
    timings["bare_load_s"] = round(time.perf_counter() - started, 1)
    bare_runs: list[dict[str, Any]] = []
    args = app_args(settings, model, pretrained, workdir)
    reserved = reserved_cpus(args)
    cpus = max(os.cpu_count() or 1, math.ceil(reserved + 1))
    report["app_args"] = args
    report["ray_cpus"] = {"reserved": reserved, "told": cpus}
    env = {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": cpus})}
    if settings.worker_niceness is not None:  # Ray starts every worker (replicas, the job's actors) at this
        env["RAY_worker_niceness"] = str(settings.worker_niceness)
    server = OurServer(workdir / "server", args, env=env)
    served = args["served_model_name"]
    client = None
    try:
        started = time.perf_counter()
        server.start()
        server.wait_ready(TextPayload(model=served, distinct=4).prepare(), 600)
        timings["server_start_s"] = round(time.perf_counter() - started, 1)
        client = BatchClient(server.base_url, settings.job_timeout_s)
        if "throughput" in settings.parts:
            started = time.perf_counter()
            report["throughput"] = run_throughput(settings, client, served, bare, files, server.process.pid)
            bare_runs += report["throughput"]["bare_runs"]
            timings["throughput_s"] = round(time.perf_counter() - started, 1)
        if "priority" in settings.parts:
            started = time.perf_counter()
            # the batch must outlast the window: sized at the fastest rate seen (the job's own, or bare's)
            image_job = report.get("throughput", {}).get("jobs", {}).get("image", {})
            if bare_rates(bare_runs, settings.batch_size)["image"] is None:
                bare_runs.append(measure_bare(bare, "image", settings.batch_size))
            rate = max(image_job.get("steady_items_per_s") or 0.0, image_job.get("items_per_s") or 0.0,
                       bare_rates(bare_runs, settings.batch_size)["image"] or 0.0)
            report["priority"] = run_priority(settings, client, server, served, bare, rate, files)
            timings["priority_s"] = round(time.perf_counter() - started, 1)
        if "memory" in settings.parts:
            started = time.perf_counter()
            report["memory"] = run_memory(settings, client, server, served, files)
            timings["memory_s"] = round(time.perf_counter() - started, 1)
        report["server_log_tail"] = server.log_tail(15)
    finally:
        if client is not None:
            client.close()
        server.stop()
    report["bare"] = {"model": model, "threads": settings.threads, "batch": settings.batch_size,
                      "load_seconds": round(bare.load_seconds, 2), "device": bare.core.device,
                      "kernels": bare.core.kernels, "runs": bare_runs,
                      "items_per_s": bare_rates(bare_runs, settings.batch_size)}
    report["timings"] = timings
    report["goals"] = goals(report)
    return report


# ------------------------------------------------------------------ the printed tables


def top_cpu(cpu_s_by_title: dict[str, float], count: int = 7) -> str:
    """`title cpu_s, ...` of the largest, the `ray::` prefix dropped."""
    ranked = sorted(cpu_s_by_title.items(), key=lambda kv: -kv[1])[:count]
    return ", ".join(f"{title.removeprefix('ray::')} {cpu:.1f}" for title, cpu in ranked)


def bulk_table(report: dict[str, Any]) -> str:
    from serve_app.bench.report import fmt, format_table

    parts = []
    tp = report.get("throughput")
    if tp:
        rows = []
        lines = []
        jobs = {**({"warmup": tp["warmup"]} if tp.get("warmup") else {}), **tp["jobs"]}
        for kind, job in jobs.items():
            s = tp.get("summary", {}).get(kind, {})
            rows.append([kind, job["items"], job["status"], fmt(job["wall_s"], 2), fmt(job["items_per_s"], 1),
                         job["job_s"], fmt(job["job_items_per_s"], 1), fmt(job["steady_items_per_s"], 1),
                         fmt(s.get("bare_items_per_s"), 1), s.get("wall_over_bare"), s.get("job_over_bare"),
                         s.get("steady_over_bare"), fmt(job["validating_s"], 2), fmt(job["stages_start_s"], 2),
                         fmt(job["tail_s"], 2)])
            extra = job if kind == "warmup" else tp.get("extras", {}).get(kind, {})
            seen = (extra.get("rss") or {}).get("first_seen_s")
            if seen:
                steps = stage_timeline(seen)
                lines.append(f"{kind}: created 0 s, in progress {fmt(job['validating_s'], 1)} s, "
                             + ", ".join(f"{name.replace('_', ' ')} {fmt(t, 1)} s" for name, t in steps.items()
                                         if t is not None)
                             + f", first results counted {fmt(job['first_result_s'], 1)} s, "
                             f"{job['status']} {fmt(job['wall_s'], 1)} s")
            cpu = (extra.get("rss") or {}).get("cpu_s_by_title")
            if cpu:
                lines.append(f"{kind}: CPU s by process: {top_cpu(cpu)}")
        parts.append(format_table(
            ["batch", "lines", "status", "wall s", "items/s", "job s", "job items/s", "steady items/s",
             "bare items/s", "wall/bare", "job/bare", "steady/bare", "validating s", "stages start s", "tail s"],
            rows) + "".join(f"\n{line}" for line in lines))
    pr = report.get("priority")
    if pr:
        rows = []
        for number, r in enumerate(pr["rounds"], 1):
            for name, w in (("without batch", r["without"]), ("with batch", r["with_batch"])):
                rows.append([number, name, fmt(w["latency_ms"]["p50"]), fmt(w["latency_ms"]["p99"]),
                             fmt(w["requests_per_s"], 2), w["ok"],
                             ", ".join(f"{k}: {v}" for k, v in w["errors"].items()) or "0",
                             r["summary"]["p99_ratio"] if name == "with batch" else ""])
        load = f"{pr['rate']} req/s open loop" if pr.get("rate") else f"c={pr['concurrency']} closed loop"
        s = pr["summary"]
        batches = "; ".join(
            f"round {n}: {r['batch']['lines']} images "
            f"{'ran through the window' if r['batch']['covered_window'] else 'ENDED BEFORE the window did'} "
            f"({r['batch']['images_per_s_during_window']} images/s), then {r['batch']['final_status']}, its stages "
            f"gone {r.get('stages_gone_s')} s after"
            for n, r in enumerate(pr["rounds"], 1))
        parts.append(format_table(["round", f"online {pr['online_payload']['kind']} x1, {load}", "p50 ms",
                                   "p99 ms", "req/s", "ok", "errors", "p99 with/without"], rows)
                     + f"\np99 with/without, median of {len(pr['rounds'])} round(s): {s['p99_ratio']}x "
                     f"(rounds {s['p99_ratios']}; p50 {s['p50_ratio']}x); niceness {pr['niceness']}"
                     f"{', SCHED_IDLE' if pr.get('idle') else ''}, {pr['preprocess_concurrency']} preprocessing "
                     f"actor(s)\n{batches}"
                     + "".join(f"\nCPU s by process, {name.replace('_', ' ')}: {top_cpu(c)}"
                               for name, c in pr.get("cpu_s_by_title", {}).items())
                     + f"\nniceness seen (0 unless listed): "
                     + (", ".join(f"{t.removeprefix('ray::')} {n}" for t, n in pr.get("niceness_seen", {}).items())
                        or "none"))
    mem = report.get("memory")
    if mem:
        rows = [[r["lines"], fmt(r["timing"]["wall_s"], 1), r["timing"]["status"], r["runner_before_mib"],
                 r["runner_peak_mib"], r["runner_growth_mib"], r["job_processes_peak_mib"],
                 r["runner_plus_job_peak_mib"], r["job_processes"]] for r in mem["rows"]]
        s = mem["summary"]
        parts.append(format_table(["text lines", "wall s", "status", "runner before MiB", "runner peak MiB",
                                   "runner growth MiB", "job processes peak MiB", "runner+job peak MiB",
                                   "job processes"], rows)
                     + (f"\npeak large/small: runner {s['runner_peak_ratio']}x, job processes "
                        f"{s['job_processes_peak_ratio']}x, together {s['total_peak_ratio']}x" if s else ""))
    rows = [[name, g["value"], g["goal"], {True: "yes", False: "NO", None: "not measured"}[g["met"]]]
            for name, g in report.get("goals", {}).items()]
    parts.append(format_table(["goal", "value", "target", "met"], rows))
    return "\n\n".join(parts)
