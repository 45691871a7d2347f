"""`clip-bench hostile`: the hostile corpus, requests within every limit that would cost far more than they
should, sent concurrently with good traffic; what each class costs and what the replicas keep.

    clip-bench hostile --requests 1000 --concurrency 6

Each class is a request a key holder may send (README.md, Security): lists of items that fail validation, a
body of millions of JSON values, token-id arrays, a JPEG whose refinement scan repeats thousands of times,
texts of random words (the tokenizer's cache), one-word texts at the length limit, label x template products
and classify responses at the limits, chat messages with many parts. The run reports per class the statuses
and the worst time to answer, the good requests' vectors against a baseline, the worst `/livez` answer
during the run (the ingress's event loop), and the RSS of every Serve replica after a warm-up round and after
the corpus. The integration test (tests/integration/test_hostile_corpus.py) runs the same corpus against
the test app.
"""

import io
import json
import random
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

@dataclass(frozen=True)
class Limits:
    """The limits of the app under test that the corpus aims at (its `build_app` args)."""

    max_inputs: int = 2048
    max_labels: int = 4096
    max_templates: int = 128
    max_text_chars: int = 16_000
    max_template_chars: int = 256
    max_body_bytes: int = 32 * 1024 * 1024

    @classmethod
    def of(cls, app_args: dict[str, Any]) -> "Limits":
        from serve_app.config import AppArgs

        args = AppArgs.model_validate(app_args)
        return cls(args.max_inputs_per_request, args.zero_shot.max_labels, args.zero_shot.max_templates,
                   args.limits.max_text_chars, args.limits.max_template_chars, args.limits.max_body_bytes)


@dataclass(frozen=True)
class Hostile:
    name: str  # the class
    path: str
    body: bytes
    expect: tuple[int, ...]  # a refusal (4xx), or 200 where the request is valid


def _random_words(rng: random.Random, chars: int) -> str:
    words, size = [], 0
    while size < chars - 12:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def scan_bomb(repeats: int = 2000, size: int = 1024) -> bytes:
    """A progressive JPEG of plain grey whose last refinement scan repeats `repeats` times: tens of kilobytes,
    within every size limit, and a pass over the whole image per repeat for a decoder that reads them all."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, "JPEG", quality=90, progressive=True)
    raw = buffer.getvalue()
    last_scan = raw[raw.rfind(b"\xff\xda"):-2]
    return raw[:-2] + last_scan * repeats + b"\xff\xd9"


def chunky_png(chunks: int = 80_000) -> bytes:
    """A 4x3 PNG followed by empty private chunks: each costs Pillow a Python-level read."""
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (1, 2, 3)).save(buffer, "PNG")
    raw = buffer.getvalue()
    chunk = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
    return raw[:33] + chunk * chunks + raw[33:]


def corpus(model: str, limits: Limits, seed: int = 0) -> list[Hostile]:
    """One request of each class, sized to what the limits allow (a new random draw per seed)."""
    import base64

    rng = random.Random(seed)
    dump = lambda body: json.dumps({"model": model, **body}).encode()  # noqa: E731
    body_room = min(limits.max_body_bytes, 4 * 1024 * 1024) - 1024
    empty_objects = body_room // 4  # `{}, `
    text = limits.max_text_chars
    template_chars = limits.max_template_chars - 2
    label_chars = max(1, min(text, 83))
    bomb = base64.b64encode(scan_bomb()).decode()
    chunky = base64.b64encode(chunky_png(min(80_000, body_room // 20))).decode()
    texts_in_budget = max(1, min(limits.max_inputs, 20))
    huge_integers = b'{"model": "' + model.encode() + b'", "input": ["x"], "note": [' + b",".join(
        [b"7" * 4000] * max(1, min(2000, body_room // 8000))) + b"]}"
    return [
        Hostile("validation-amplification", "/v1/embeddings", dump({"input": [{}] * empty_objects}), (413,)),
        Hostile("validation-at-the-count-limit", "/v1/embeddings", dump({"input": [{}] * limits.max_inputs}), (400,)),
        Hostile("labels-of-wrong-type", "/v1/classify",
                dump({"input": ["x"], "labels": [[]] * limits.max_labels}), (400,)),
        Hostile("documents-of-wrong-type", "/v1/rerank",
                dump({"query": "q", "documents": [{}] * limits.max_inputs}), (400,)),
        Hostile("token-id-array", "/v1/embeddings", dump({"input": [[7] * (body_room // 3)]}), (400, 413)),
        Hostile("messages-many-parts", "/v1/embeddings",
                dump({"messages": [{"content": [{"text": "a"}] * limits.max_inputs}] * 4}), (400,)),
        Hostile("jpeg-scan-bomb", "/v1/embeddings", dump({"input": [{"image": bomb}]}), (400,)),
        Hostile("random-words", "/v1/embeddings",
                dump({"input": [_random_words(rng, min(text, 600)) for _ in range(min(limits.max_inputs, 32))]}),
                (200,)),
        Hostile("one-long-word", "/v1/embeddings",
                dump({"input": ["".join(rng.choice(string.ascii_lowercase) for _ in range(text))] * 4}), (200, 400)),
        Hostile("prompt-product", "/v1/classify", dump({
            "input": ["x"], "prompt_templates": [_random_words(rng, template_chars).replace(" ", "") + "{}"
                                                 for _ in range(limits.max_templates)],
            "labels": ["".join(rng.choice(string.ascii_lowercase) for _ in range(label_chars))
                       for _ in range(limits.max_labels)]}), (400,)),
        Hostile("blank-lines", "/v1/embeddings", dump({"input": ["\n" * text] * texts_in_budget}), (200, 400)),
        Hostile("emoji-runs", "/v1/embeddings", dump({"input": ["\U0001F600" * text] * texts_in_budget}), (200, 400)),
        Hostile("huge-integers", "/v1/embeddings", huge_integers, (400,)),
        Hostile("png-of-empty-chunks", "/v1/embeddings", dump({"input": [{"image": chunky}]}), (400, 413)),
        Hostile("classify-every-score", "/v1/classify", dump({
            "input": [f"text {i}" for i in range(limits.max_inputs)],
            "labels": [f"label {i}" for i in range(limits.max_labels)]}), (200, 400)),
    ]


GOOD_TEXTS = ["a photo of a cat", "a diagram of a bridge", "a red bicycle"]


@dataclass
class HostileSettings:
    requests: int = 1000
    concurrency: int = 6
    good_clients: int = 2
    probe_interval_s: float = 0.02
    seed: int = 0


@dataclass
class ClassResult:
    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    worst_s: float = 0.0
    unexpected: list[str] = field(default_factory=list)


def run_corpus(base_url: str, model: str, limits: Limits, settings: HostileSettings,
               rss: Any = None) -> dict[str, Any]:
    """Sends `settings.requests` hostile requests (the classes in turn, fresh random draws) with good
    clients and a `/livez` probe running beside them. `rss()`, if given, returns the replicas' RSS
    (`report.replica_rss`): read after one warm-up round of every class and again at the end."""
    import httpx

    classes = [h.name for h in corpus(model, limits)]
    results = {name: ClassResult() for name in classes}
    lock = threading.Lock()
    stop = threading.Event()
    headers = {"content-type": "application/json"}
    good_body = json.dumps({"model": model, "input": GOOD_TEXTS})

    with httpx.Client(timeout=120) as client:
        first = client.post(f"{base_url}/v1/embeddings", content=good_body, headers=headers)
        if first.status_code != 200:
            raise RuntimeError(f"the good request failed before the corpus: {first.status_code} {first.text[:500]}")
        baseline = np.array([d["embedding"] for d in first.json()["data"]])

    def send(hostile: Hostile) -> None:
        with httpx.Client(timeout=180) as client:
            start = time.perf_counter()
            try:
                status = client.post(base_url + hostile.path, content=hostile.body, headers=headers).status_code
            except httpx.HTTPError as exc:
                status = -1
                detail = type(exc).__name__
            else:
                detail = str(status)
            elapsed = time.perf_counter() - start
        with lock:
            result = results[hostile.name]
            result.sent += 1
            result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
            result.worst_s = max(result.worst_s, elapsed)
            if status not in hostile.expect:
                result.unexpected.append(detail)

    good = {"ok": 0, "wrong_vectors": 0, "errors": 0, "worst_s": 0.0}

    def good_client() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    response = client.post(f"{base_url}/v1/embeddings", content=good_body, headers=headers)
                except httpx.HTTPError:
                    response = None
                elapsed = time.perf_counter() - start
                with lock:
                    good["worst_s"] = max(good["worst_s"], elapsed)
                    if response is None or response.status_code != 200:
                        good["errors"] += 1
                        continue
                    got = np.array([d["embedding"] for d in response.json()["data"]])
                    if got.shape != baseline.shape or not np.allclose(got, baseline, atol=1e-5):
                        good["wrong_vectors"] += 1
                    else:
                        good["ok"] += 1

    probe: dict[str, Any] = {"answers": 0, "failures": 0, "worst_s": 0.0}
    probe_times: list[float] = []

    def liveness() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(f"{base_url}/livez").status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                probe["answers" if ok else "failures"] += 1
                probe["worst_s"] = max(probe["worst_s"], elapsed)
                probe_times.append(elapsed)
                time.sleep(settings.probe_interval_s)

    # Warm-up: one round of every class, so that caches, allocator arenas and first-call costs are in the
    # "before" reading, not counted as growth.
    for hostile in corpus(model, limits, seed=settings.seed):
        send(hostile)
    before = rss() if rss else {}
    for result in results.values():
        result.sent, result.statuses, result.worst_s, result.unexpected = 0, {}, 0.0, []

    background = [threading.Thread(target=good_client) for _ in range(settings.good_clients)]
    background.append(threading.Thread(target=liveness))
    for thread in background:
        thread.start()
    start = time.perf_counter()
    try:
        rounds = -(-settings.requests // len(classes))
        jobs = [h for r in range(rounds) for h in corpus(model, limits, seed=settings.seed + 1 + r)]
        with ThreadPoolExecutor(settings.concurrency) as pool:
            list(pool.map(send, jobs[: settings.requests]))
    finally:
        stop.set()
        for thread in background:
            thread.join()
    wall_s = time.perf_counter() - start
    if probe_times:
        probe["p50_s"], probe["p99_s"] = (round(float(v), 4) for v in np.percentile(probe_times, [50, 99]))
    after = rss() if rss else {}
    memory = []
    for pid in sorted(set(before) & set(after)):
        first, last = before[pid]["rss_mib"], after[pid]["rss_mib"]
        memory.append({"replica": before[pid]["replica"], "pid": int(pid), "before_mib": first, "after_mib": last,
                       "growth": round(last / first - 1, 4)})
    return {"wall_s": round(wall_s, 1), "classes": {k: asdict(v) for k, v in results.items()},
            "good": good, "livez": probe, "memory": memory,
            "replicas_gone": sorted(set(before) - set(after))}


def hostile_table(report: dict[str, Any]) -> str:
    from serve_app.bench.report import fmt, format_table

    classes = format_table(
        ["class", "sent", "statuses", "worst s", "unexpected"],
        [[name, r["sent"], ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items())), fmt(r["worst_s"], 2),
          len(r["unexpected"])] for name, r in report["classes"].items()],
    )
    memory = format_table(
        ["replica", "pid", "RSS before MiB", "RSS after MiB", "growth"],
        [[m["replica"], m["pid"], m["before_mib"], m["after_mib"], f"{100 * m['growth']:.1f} %"]
         for m in report["memory"]],
    )
    good, live = report["good"], report["livez"]
    summary = (f"good requests: {good['ok']} correct, {good['wrong_vectors']} wrong vectors, {good['errors']} "
               f"errors, worst {good['worst_s']:.2f} s; /livez: {live['answers']} answers, {live['failures']} "
               f"failures, p50 {1000 * live.get('p50_s', 0):.0f} ms, p99 {1000 * live.get('p99_s', 0):.0f} ms, worst "
               f"{1000 * live['worst_s']:.0f} ms; {report['wall_s']} s")
    return f"{classes}\n\n{memory}\n\n{summary}"


def run_hostile(model: str, pretrained: str | None, threads: int, settings: HostileSettings,
                app_args: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Starts our service (`serve run`, the three pools) and runs the corpus against it."""
    from serve_app.bench.compare import CompareSettings, our_app_args
    from serve_app.bench.payloads import TextPayload
    from serve_app.bench.report import machine_info, replica_rss
    from serve_app.bench.servers import OurServer

    args = our_app_args(CompareSettings(model=model, pretrained=pretrained, threads=threads, app_args=app_args))
    server = OurServer(Path(workdir), args)
    with server:
        server.wait_ready(TextPayload(model=args["served_model_name"]).prepare(), 600)
        report = run_corpus(server.base_url, args["served_model_name"], Limits.of(args), settings,
                            rss=lambda: replica_rss(server.process.pid))
    return {"tool": "clip-bench hostile", "settings": asdict(settings), "app_args": args,
            "machine": machine_info(), **report}
