"""The benchmark tool, for real, on the tiny random model: bare mode, the load generator against the naive
server (a subprocess on a free loopback port), error accounting by status, JSON and PNG output, compare's
bracketing and ratios, and the GPU script's CPU smoke path. No timing thresholds: numbers are only checked
for sanity (positive, ordered, consistent counts).
"""

import json
from pathlib import Path

import pytest

from serve_app.bench import payloads as P
from serve_app.bench.bare import BareModel, BareSettings, model_spec, reference, single_latency_ms
from serve_app.bench.cli import main
from serve_app.bench.loadgen import Level, LoadSettings, run_load
from serve_app.bench.report import format_table, latency_summary, percentile
from serve_app.bench.servers import NaiveServer, free_port

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quick(**kw) -> LoadSettings:
    return LoadSettings(**{"duration_s": 30.0, "warmup_s": 0.0, "timeout_s": 30.0, "progress": False, **kw})


@pytest.fixture(scope="module")
def naive_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    server = NaiveServer(tmp_path_factory.mktemp("naive"), f"local-dir:{tiny_model_dir}", None, 1, "tiny")
    server.start()
    try:
        server.wait_ready(P.TextPayload(model="tiny", distinct=1), timeout_s=90)
        yield server.base_url
    finally:
        server.stop()
    assert server.process is None


# ------------------------------------------------------------------ pure helpers


def test_percentiles_interpolate_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([], 50) is None
    summary = latency_summary([0.001, 0.002, 0.003])
    assert summary["p50"] == pytest.approx(2.0) and summary["max"] == pytest.approx(3.0)
    assert latency_summary([])["p99"] is None


def test_format_table_is_markdown():
    table = format_table(["a", "bb"], [[1, None], ["xyz", 2.5]]).splitlines()
    assert table[0].startswith("| a ") and table[1].startswith("|---") and "xyz" in table[2 + 1]


def test_payloads_are_distinct_decodable_jpegs():
    import base64
    import io

    from PIL import Image

    payload = P.make_payload("image", model="m", width=64, height=48, distinct=3, items_per_request=2).prepare()
    bodies = [json.loads(payload.request(i).body) for i in range(3)]
    uris = [u for b in bodies for u in b["input"]]
    assert len(set(uris)) == 6 and all(b["modality"] == "image" and b["model"] == "m" for b in bodies)
    image = Image.open(io.BytesIO(base64.b64decode(uris[0].split(",", 1)[1])))
    assert image.format == "JPEG" and image.size == (64, 48)
    assert payload.request(3).body == payload.request(0).body  # cycles through the pool
    texts = P.short_texts(50)
    assert len(set(texts)) == 50


def test_classify_payload_has_issue_3_shape():
    payload = P.make_payload("classify", model="m", width=32, height=32, distinct=1, labels=5, templates="imagenet")
    request = payload.prepare().request(0)
    body = json.loads(request.body)
    assert request.path == "/v1/classify"
    assert len(body["labels"]) == 5 and body["prompt_templates"] == "imagenet" and len(body["input"]) == 1
    assert body["modality"] == "image"  # plain strings are images only with infinity's `modality`


def test_invalid_every_marks_requests():
    payload = P.TextPayload(model="m", distinct=2, invalid_every=3).prepare()
    kinds = [payload.request(i).kind for i in range(6)]
    assert kinds == ["ok", "ok", "invalid", "ok", "ok", "invalid"]


def test_hf_tokenizer_files_match_open_clip(tmp_path: Path):
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from serve_app.bench.hf_clip import write_tokenizer_files

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    write_tokenizer_files(bpe, tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    reference = SimpleTokenizer(str(bpe)).encoder  # open_clip names its two special tokens differently
    assert {k: v for k, v in vocab.items() if v < 49406} == {k: v for k, v in reference.items() if v < 49406}
    assert vocab["<|startoftext|>"] == reference["<start_of_text>"] == 49406
    assert vocab["<|endoftext|>"] == reference["<end_of_text>"] == 49407
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")


# ------------------------------------------------------------------ bare


def test_bare_measures_every_batch_size(tiny_model_dir: Path):
    settings = BareSettings(image_batches=[1, 3], text_batches=[1, 4], min_seconds=0.0, min_iterations=2,
                            warmup_iterations=1, width=64, height=48, distinct=5)
    bare = BareModel(model_spec(f"local-dir:{tiny_model_dir}", None, threads=1), settings)
    result = bare.run()
    by_key = {(r["modality"], r["batch"]): r for r in result["results"]}
    assert set(by_key) == {("image", 1), ("image", 3), ("text", 1), ("text", 4)}
    for r in by_key.values():
        assert r["iterations"] >= 2 and r["items_per_s"] > 0
        assert 0 < r["batch_latency_ms"]["p50"] <= r["batch_latency_ms"]["max"]
    assert result["threads"] == 1 and result["device"] == "cpu"
    # the reference for a concurrency is the best batch size not above it
    assert reference(result, "image", 1) == by_key[("image", 1)]["items_per_s"]
    assert reference(result, "image", 8) == max(by_key[("image", 1)]["items_per_s"], by_key[("image", 3)]["items_per_s"])
    assert single_latency_ms(result, "text") == by_key[("text", 1)]["batch_latency_ms"]["p50"]


def test_cli_bare_writes_json(tiny_model_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "bare.json"
    main(["bare", "--model", f"local-dir:{tiny_model_dir}", "--pretrained", "", "--threads", "1",
          "--image-batches", "2", "--text-batches", "2", "--min-seconds", "0", "--image-size", "64x48", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["tool"] == "clip-bench bare" and report["machine"]["cpus"] >= 1
    assert [(r["modality"], r["batch"]) for r in report["results"]] == [("image", 2), ("text", 2)]
    assert "items/s" in capsys.readouterr().out


# ------------------------------------------------------------------ load generator against the naive server


def test_load_counts_successes_and_errors_by_status(naive_url: str):
    payload = P.ImagePayload(model="tiny", width=64, height=48, distinct=4, invalid_every=4)
    result = run_load(naive_url, payload, [Level(concurrency=2)], quick(max_requests=24))[0]
    assert result.completed == 24  # the window closed on the count, well before its 30 s
    assert set(result.status_counts) == {"200", "400"}
    assert result.errors == {"400": result.status_counts["400"]} and result.error_count == result.errors["400"]
    assert result.ok + result.error_count == result.completed
    assert 24 // 4 - 2 <= result.errors["400"] <= 24 // 4 + 2  # every 4th request is corrupt
    assert result.items_ok == result.ok and result.items_per_s > 0 and result.requests_per_s > 0
    lat = result.latency_ms
    assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert result.first_ok_latency_ms is not None and result.sent >= result.completed


def test_load_fixed_rate_is_open_loop(naive_url: str):
    payload = P.TextPayload(model="tiny", distinct=8)
    result = run_load(naive_url, payload, [Level(rate=40.0)], quick(duration_s=1.0))[0]
    assert result.rate == 40.0 and result.concurrency is None
    assert 30 <= result.sent <= 41 and result.dropped == 0
    assert result.errors == {} and result.ok == result.completed > 0


def test_load_several_items_per_request_and_levels(naive_url: str):
    payload = P.TextPayload(model="tiny", distinct=3, items_per_request=3)
    results = run_load(naive_url, payload, [Level(concurrency=1), Level(concurrency=3)], quick(max_requests=6))
    assert [r.concurrency for r in results] == [1, 3]
    for r in results:
        assert r.ok == 6 and r.items_ok == 18 and r.errors == {}


def test_unreachable_server_counts_client_errors():
    url = f"http://127.0.0.1:{free_port()}"
    result = run_load(url, P.TextPayload(model="x", distinct=1), [Level(concurrency=1)], quick(max_requests=3))[0]
    assert result.ok == 0 and result.error_count == 3 and list(result.errors) == ["ConnectError"]
    assert result.latency_ms["p50"] is None


def test_cli_load_writes_json_and_png(naive_url: str, tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")  # the `bench` extra (also in `test`)
    out = tmp_path / "load.json"
    main(["load", "--url", naive_url, "--model", "tiny", "--payload", "text", "--concurrency", "1,2",
          "--duration", "0.5", "--warmup", "0", "--invalid-every", "3", "--out", str(out), "--no-progress"])
    report = json.loads(out.read_text())
    assert report["tool"] == "clip-bench load" and report["payload"]["kind"] == "text"
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert level["ok"] > 0 and set(level["errors"]) == {"400"}
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert "p99 ms" in capsys.readouterr().out


# ------------------------------------------------------------------ compare


def test_compare_end_to_end_with_the_naive_server(tiny_model_dir: Path, tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")  # the `bench` extra (also in `test`)
    out = tmp_path / "cmp.json"
    main(["compare", "--model", f"local-dir:{tiny_model_dir}", "--pretrained", "", "--threads", "1",
          "--systems", "naive", "--levels", "1,2", "--image-size", "64x48", "--duration", "0.5", "--warmup", "0",
          "--bare-min-seconds", "0", "--distinct", "4", "--workdir", str(tmp_path / "work"), "--out", str(out),
          "--no-progress"])
    result = json.loads(out.read_text())
    assert len(result["bare_runs"]) == 2  # bracketed: before and after the naive server
    naive = result["served"]["naive"]
    assert naive["bare_before"] == 0 and naive["bare_after"] == 1 and naive["startup_s"] > 0
    assert naive["rss_ready"] and naive["rss_ready"][0]["rss_mib"] > 0
    assert {r["modality"] for r in naive["bare_beside_idle"]["results"]} == {"image", "text"}
    for modality in ("image", "text"):
        assert [lv["concurrency"] for lv in naive["modalities"][modality]] == [1, 2]
    table = out.with_suffix(".md").read_text()
    assert "| naive" in table and "× bare" in table and "× bare alone" in table
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC


def level_dict(c: int, rate: float, p50: float) -> dict:
    return {"concurrency": c, "items_per_s": rate, "errors": {}, "latency_ms": {"p50": p50, "p95": p50, "p99": p50}}


def _fake_result() -> dict:
    def bare(image_rate: float) -> dict:
        return {"results": [
            {"modality": "image", "batch": 1, "items_per_s": image_rate / 2,
             "batch_latency_ms": {"p50": 100.0, "p95": 110.0, "p99": 120.0}},
            {"modality": "image", "batch": 8, "items_per_s": image_rate,
             "batch_latency_ms": {"p50": 400.0, "p95": 410.0, "p99": 420.0}},
        ]}

    def level(c: int, rate: float, p50: float) -> dict:
        return {"concurrency": c, "items_per_s": rate, "errors": {},
                "latency_ms": {"p50": p50, "p95": p50, "p99": p50}}

    return {
        "settings": {"modalities": ["image"], "levels": [1, 8], "model": "m"},
        "machine": {"cpus": 2},
        "bare_runs": [bare(20.0), bare(10.0), bare(20.0)],  # the CPU slowed down during the naive run
        "served": {
            "ours": {"bare_before": 0, "bare_after": 1, "bare_beside_idle": bare(12.0),
                     "modalities": {"image": [level(1, 6.0, 110.0), level(8, 13.5, 500.0)]}},
            "naive": {"bare_before": 1, "bare_after": 2, "modalities": {"image": [level(1, 5.0, 120.0), level(8, 5.0, 900.0)]}},
        },
    }


def test_compare_ratios_use_the_bracketing_bare_runs():
    from serve_app.bench.compare import compare_rows, compare_tables

    rows = {(r["system"], r["concurrency"]): r for r in compare_rows(_fake_result())}
    # ours is bracketed by bare runs 0 and 1 (20 and 10 images/s at batch 8): mean 15
    assert rows[("ours", 8)]["x_bare"] == pytest.approx(13.5 / 15)
    assert rows[("naive", 8)]["x_bare"] == pytest.approx(5.0 / 15)
    assert rows[("ours", 8)]["x_naive"] == pytest.approx((13.5 / 15) / (5.0 / 15))
    # at concurrency 1 only batch 1 counts as the reference: mean of 10 and 5
    assert rows[("ours", 1)]["x_bare"] == pytest.approx(6.0 / 7.5)
    assert rows[("bare", 8)]["items_per_s"] == pytest.approx((20 + 10 + 20) / 3)
    text = compare_tables(_fake_result())
    assert "images/s ≥ 0.9 × bare (c=8) | 0.90 | yes" in text
    assert "image p50 at c=1 ≤ bare single + 15 ms (margin ms) | 5.00 | yes" in text


def test_compare_reports_bare_beside_each_idle_server():
    from serve_app.bench.compare import compare_tables, idle_rows

    idle = {(r["system"], r["concurrency"]): r for r in idle_rows(_fake_result())}
    assert set(idle) == {("ours", 1), ("ours", 8)}  # naive has no such run in this result
    # beside idle ours: 12 images/s at batch 8, against ours' bracketing bare runs' mean of 15
    assert idle[("ours", 8)]["x_bare"] == pytest.approx(12 / 15)
    assert idle[("ours", 1)]["x_bare"] == pytest.approx(6 / 7.5)
    assert "| image | 8 | ours | 12.00 | 0.80 |" in " ".join(compare_tables(_fake_result()).split())


# ------------------------------------------------------------------ gpu script, CPU smoke path


def test_gpu_script_runs_on_cpu_with_the_tiny_model(tmp_path: Path):
    from serve_app.bench.gpu import GpuRun, smoke_settings, summary_table

    settings = smoke_settings(tmp_path)
    settings.served = False  # Ray Serve's part is covered by the service's own tests; keep this one fast
    settings.compile = False
    out = tmp_path / "gpu.json"
    result = GpuRun(settings, out).run()
    assert json.loads(out.read_text())["image"] == result["image"]
    combos = {(r["precision"], r["attention"], r["batch"]) for r in result["image"]}
    assert combos == {(p, a, b) for p in ("fp32", "bf16") for a in ("sdpa", "math") for b in (1, 4)}
    assert result["gflop_per_image"] > 0 and not result["errors"]
    for r in result["image"]:
        assert r["tflops"] == pytest.approx(r["images_per_s"] * result["gflop_per_image"] / 1e3)
        assert r["mfu"] == pytest.approx(r["tflops"] / settings.peak_tflops)
    assert result["text"] and result["text"][0]["prompts_per_s"] > 0
    assert "MFU %" in summary_table(result)


def test_gpu_budget_skips_and_records():
    from serve_app.bench.gpu import GpuRun, GpuSettings

    run = GpuRun(GpuSettings(device="cpu", budget_s=0.0, served=False), None).run()
    assert run["image"] == [] and run["skipped"]


def test_cli_gpu_smoke_writes_json_and_table(tmp_path: Path, capsys, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the smoke run's tiny model goes
    out = tmp_path / "gpu.json"
    main(["gpu", "--smoke", "--no-served", "--no-compile", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["served"] is None and result["image"] and result["settings"]["device"] == "cpu"
    assert "images/s" in out.with_suffix(".md").read_text() and "MFU %" in capsys.readouterr().out
    assert list(scratch.iterdir()) == []  # removed after the run: every `make test` runs this


def test_our_app_args_fit_small_machines(monkeypatch):
    import os

    from serve_app.bench.compare import SMALL_MACHINE_ARGS, CompareSettings, default_cpu_reservation, our_app_args

    settings = CompareSettings(model="ViT-B-32", pretrained="random", threads=2)
    needed = default_cpu_reservation({"model": "ViT-B-32"})
    monkeypatch.setattr(os, "cpu_count", lambda: int(needed) + 8)
    roomy = our_app_args(settings)
    assert "preprocessor" not in roomy and roomy["torch_threads"] == 2 and roomy["served_model_name"] == "bench"
    monkeypatch.setattr(os, "cpu_count", lambda: 1 if needed > 1 else 0)
    small = our_app_args(settings)
    assert small["preprocessor"] == SMALL_MACHINE_ARGS["preprocessor"] and small["ingress"] == SMALL_MACHINE_ARGS["ingress"]
    settings.app_args = {"ingress": {"num_cpus": 0.1}}  # explicit args win
    assert our_app_args(settings)["ingress"] == {"num_cpus": 0.1}


def test_ours_in_one_process_runs_the_same_args_in_that_layout(monkeypatch):
    import os

    from serve_app.bench.compare import CompareSettings, one_process_app_args, our_app_args
    from serve_app.config import AppArgs

    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the pools' args would gain small-machine reservations
    settings = CompareSettings(model="ViT-B-32", pretrained="random", threads=2, app_args={"max_batch_size": 16})
    pools, one = our_app_args(settings), one_process_app_args(settings)
    assert "ingress" in pools and "ingress" not in one and "preprocessor" not in one
    assert one == {**{k: v for k, v in pools.items() if k not in ("ingress", "preprocessor")}, "layout": "one-process"}
    assert AppArgs.model_validate(one).layout == "one-process"


def test_compare_reports_targets_for_each_layout_of_ours():
    from serve_app.bench.compare import compare_rows, compare_tables

    result = _fake_result()
    result["served"]["ours-1p"] = {"bare_before": 1, "bare_after": 2,
                                   "modalities": {"image": [level_dict(1, 7.0, 105.0), level_dict(8, 14.0, 450.0)]}}
    rows = {(r["system"], r["concurrency"]): r for r in compare_rows(result)}
    assert rows[("ours-1p", 8)]["x_bare"] == pytest.approx(14.0 / 15)
    assert rows[("ours-1p", 8)]["x_ours"] == pytest.approx((14.0 / 15) / (13.5 / 15))
    text = compare_tables(result)
    assert "| images/s ≥ 0.9 × bare (c=8) | 0.90 | yes |" in text
    assert "| ours-1p: images/s ≥ 0.9 × bare (c=8) | 0.93 | yes |" in text
    assert "× ours-1p" in text


def test_our_server_runs_ray_as_production_unless_the_caller_says_otherwise(monkeypatch, tmp_path: Path):
    from serve_app.bench.servers import OurServer
    from serve_app.ray_env import HAPROXY_NODE_PORTS, serve_env

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")  # the caller measures the other mode
    server = OurServer(tmp_path, {"model": "x"})
    assert server.env["RAY_SERVE_ENABLE_HA_PROXY"] == serve_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert server.env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert server.env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"  # stops in seconds
    ports = {server.env[name] for name in HAPROXY_NODE_PORTS}
    assert len(ports) == 2 and all(p.isdigit() for p in ports)  # its own HAProxy ports, not 8404/9101


def test_every_experiment_module_imports_and_has_an_entry_point():
    """Experiments are run by hand (BENCHMARKS.md gives each command): at least they must still import."""
    import importlib
    import pkgutil

    import serve_app.bench.experiments as experiments

    names = [m.name for m in pkgutil.iter_modules(experiments.__path__)]
    assert {"idle_wakeups", "path_latency", "pass_timing"} <= set(names)
    for name in names:
        module = importlib.import_module(f"serve_app.bench.experiments.{name}")
        assert callable(getattr(module, "main", None)) or callable(getattr(module, "build_app", None)), name


def test_closed_loop_throughput_does_not_jump_with_bursts():
    """A batching server answers all 32 clients at once every 2.2 s: 14.55 requests/s whatever the window's
    phase, while counting completions in a 15 s window gives 6 or 7 bursts (12.8 or 14.9 per s)."""
    from serve_app.bench.loadgen import Level, _Record, _summarise

    period, clients = 2.2, 32
    records = [_Record(k * period, (k + 1) * period, "200", 1) for k in range(20) for _ in range(clients)]
    rates, counted = [], []
    for phase in (3.0, 3.5, 4.5, 5.0):
        result = _summarise(Level(concurrency=clients), records, (phase, phase + 15.0), len(records), 0, None)
        rates.append(result.items_per_s)
        counted.append(result.items_per_s_completed)
        assert result.requests_per_s == pytest.approx(clients / period)
    assert rates == pytest.approx([clients / period] * 4)
    assert {round(c, 2) for c in counted} == {round(6 * clients / 15, 2), round(7 * clients / 15, 2)}
