"""The benchmark tool against a real server subprocess: the load generator against the naive server (on a
free loopback port), error accounting by status, JSON and PNG output, and `compare` end to end with the naive
server bracketed by bare runs. No timing thresholds: numbers are only checked for sanity (positive, ordered,
consistent counts). Pure parts of the tool are tested in tests/unit/test_bench_*.py.
"""

import json
from pathlib import Path

import pytest

from serve_app.bench import payloads as P
from serve_app.bench.cli import main
from serve_app.bench.loadgen import Level, LoadSettings, run_load
from serve_app.bench.servers import NaiveServer

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


def test_prep_measures_the_preprocessing_pool_by_replica_count(serve_url: str, tiny_model_dir: Path):
    """`clip-bench prep --replicas`: one Preprocessor app per replica count on the session's Ray, each with
    as many running replicas as asked, measured in every round; the apps are gone after."""
    from ray import serve

    from serve_app.bench.prep import PrepSettings, prep_tables, run_prep

    seen_replicas = {}
    original = serve.run

    def run_and_count(app, name, **kw):
        handle = original(app, name=name, **kw)
        seen_replicas[name] = serve.status().applications[name].deployments["Preprocessor"].replica_states
        return handle

    settings = PrepSettings(model=f"local-dir:{tiny_model_dir}", sizes=[(64, 48)], formats=["jpeg"],
                            decodes=["exact"], min_seconds=0.3, min_images=1, rounds=2, replicas=[1, 2],
                            replica_cpus=0.1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve, "run", run_and_count)
        report = run_prep(settings)
    assert seen_replicas == {"prep-bench-exact-1": {"RUNNING": 1}, "prep-bench-exact-2": {"RUNNING": 2}}
    rows = {r["replicas"]: r for r in report["pool"]}
    assert set(rows) == {1, 2} and all(r["images_per_s"] > 0 and len(r["rounds"]) == 2 for r in rows.values())
    assert rows[1]["scaling_vs_fewest_replicas"] == 1.0 and rows[2]["machine_cores_busy"] > 0
    assert "× fewest replicas" in prep_tables(report)
    assert not set(serve.status().applications) & set(seen_replicas)
