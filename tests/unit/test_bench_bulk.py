"""`clip-bench bulk`'s pure parts: its arguments, the batch files it writes, the timings, ratios and peaks it
reports (the run itself starts a service: see serve_app/bench/bulk.py)."""

import json

import pytest

from serve_app.bench import bulk
from serve_app.bench.cli import build_parser, bulk_settings


def _settings(*argv: str) -> bulk.BulkSettings:
    return bulk_settings(build_parser().parse_args(["bulk", *argv]))


def test_defaults_measure_vit_b_32_random_on_640x480_jpegs():
    settings = _settings()
    assert (settings.model, settings.pretrained) == ("ViT-B-32", "random")
    assert (settings.width, settings.height) == (640, 480)
    assert settings.lines == [10_000, 50_000] and settings.parts == list(bulk.PARTS)
    assert settings.niceness == 10 and settings.preprocess_concurrency == 1 and settings.concurrency == 2


def test_arguments_reach_the_settings():
    settings = _settings("--tiny", "--images", "8", "--texts", "16", "--lines", "100,500", "--window", "4",
                         "--concurrency", "3", "--niceness", "0", "--worker-niceness", "0", "--rate", "2.5",
                         "--rounds", "3",
                         "--parts", "throughput,memory",
                         "--online-payload", "text", "--batch-size", "8", "--image-size", "320x240",
                         "--app-args", '{"batch": {"lease_s": 10}}', "--workdir", "/tmp/x")
    assert settings.model is None and settings.pretrained is None  # the tiny model is written at run time
    assert (settings.images, settings.texts, settings.lines) == (8, 16, [100, 500])
    assert (settings.window_s, settings.concurrency, settings.niceness, settings.worker_niceness) == (4.0, 3, 0, 0)
    assert (settings.rate, settings.rounds) == (2.5, 3)
    assert _settings().worker_niceness is None and _settings().rate is None  # Ray's own default; a closed loop
    assert settings.parts == ["throughput", "memory"] and settings.online_payload == "text"
    assert (settings.width, settings.height, settings.batch_size) == (320, 240, 8)
    assert settings.app_args == {"batch": {"lease_s": 10}} and settings.workdir == "/tmp/x"


def test_unknown_parts_and_bad_lines_are_refused():
    with pytest.raises(SystemExit):
        _settings("--parts", "throughput,speed")
    with pytest.raises(SystemExit):
        _settings("--lines", "0,100")


def test_the_jsonl_writer_writes_one_embeddings_request_per_value(tmp_path):
    path = tmp_path / "sub" / "in.jsonl"
    written = bulk.write_requests(path, "bench", "image", bulk.cycle(["data:image/jpeg;base64,AAAA", "data:x"], 3),
                                  prefix="img")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == {"lines": 3, "bytes": path.stat().st_size}
    assert [line["custom_id"] for line in lines] == ["img-0", "img-1", "img-2"]
    assert all(line["method"] == "POST" and line["url"] == "/v1/embeddings" for line in lines)
    assert lines[0]["body"] == {"model": "bench", "encoding_format": "float",
                                "input": [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}]}
    assert lines[2]["body"]["input"][0]["image_url"]["url"] == "data:image/jpeg;base64,AAAA"  # cycled

    bulk.write_requests(path, "bench", "text", ["a dog", "a cat"], encoding_format="base64")
    texts = [json.loads(line) for line in path.read_text().splitlines()]
    assert [t["body"]["input"] for t in texts] == [["a dog"], ["a cat"]]
    assert texts[1]["custom_id"] == "r-1" and texts[1]["body"]["encoding_format"] == "base64"


def test_the_written_lines_pass_the_batch_validation(tmp_path):
    """The file is what the Batch API accepts: the job's own validation answers every line with a plan row."""
    import io

    import pyarrow.parquet as pq

    from serve_app.batch.job import JobSpec, plan_schema, validate
    from serve_app.bench.payloads import jpeg_data_uri, synthetic_jpeg
    from serve_app.config import ImageLimits, JobStages, ModelSpec, Price, RequestLimits

    images, texts = tmp_path / "images.jsonl", tmp_path / "texts.jsonl"
    bulk.write_requests(images, "ViT-B-32", "image", [jpeg_data_uri(synthetic_jpeg(64, 48, seed=1))] * 2, "i")
    bulk.write_requests(texts, "ViT-B-32", "text", ["a dog", "a cat"], "t")
    spec = JobSpec(endpoint="/v1/embeddings", models=[ModelSpec(model="ViT-B-32")], image_limits=ImageLimits(),
                   limits=RequestLimits(), url_policy="off", max_inputs_per_request=16, max_requests_per_file=10,
                   max_inputs_per_batch=10, max_line_bytes=1 << 20, stages=JobStages(), price=Price())
    plan, errors = io.BytesIO(), io.BytesIO()
    writer = pq.ParquetWriter(plan, plan_schema())
    lines = images.read_bytes().splitlines() + texts.read_bytes().splitlines()
    result = validate(iter(lines), spec, writer, errors)
    writer.close()
    assert (result.total, result.failed, result.inputs, result.images, result.errors) == (4, 0, 4, 2, [])
    assert result.model == "ViT-B-32" and errors.getvalue() == b""


def _polls(*rows):
    return [{"t": t, "status": s, "completed": c, "failed": f} for t, s, c, f in rows]


def test_batch_timing_splits_validation_stages_start_and_steady_rate():
    polls = _polls((0.2, "validating", 0, 0), (0.5, "in_progress", 0, 0), (3.0, "in_progress", 10, 0),
                   (5.0, "in_progress", 50, 0), (6.0, "finalizing", 100, 0), (6.5, "completed", 100, 0))
    batch = {"status": "completed", "request_counts": {"completed": 100, "failed": 0},
             "in_progress_at": 1000, "completed_at": 1006}
    timing = bulk.batch_timing(polls, batch, 100)
    assert timing["wall_s"] == 6.5 and timing["items_per_s"] == pytest.approx(100 / 6.5)
    assert timing["job_s"] == 6 and timing["job_items_per_s"] == pytest.approx(100 / 6)
    assert timing["validating_s"] == 0.5 and timing["first_result_s"] == 3.0
    assert timing["stages_start_s"] == 2.5
    assert timing["steady_items_per_s"] == pytest.approx(40 / 2.0) and timing["tail_s"] == 1.5


def test_batch_timing_of_a_batch_too_quick_to_see_running():
    timing = bulk.batch_timing(_polls((0.25, "validating", 0, 0), (0.5, "completed", 4, 0)),
                               {"status": "completed", "request_counts": {"completed": 4, "failed": 0},
                                "in_progress_at": 10, "completed_at": 10}, 4)
    assert timing["wall_s"] == 0.5 and timing["steady_items_per_s"] is None and timing["job_items_per_s"] is None


def test_ratios_against_bare_and_the_goals():
    runs = [{"results": [{"modality": "image", "batch": 32, "items_per_s": 10.0},
                         {"modality": "text", "batch": 32, "items_per_s": 100.0}]},
            {"results": [{"modality": "image", "batch": 32, "items_per_s": 12.0},
                         {"modality": "text", "batch": 32, "items_per_s": 100.0},
                         {"modality": "text", "batch": 1, "items_per_s": 5.0}]}]
    rates = bulk.bare_rates(runs, 32)
    assert rates == {"image": 11.0, "text": 100.0}
    jobs = {"image": {"items_per_s": 9.9, "job_items_per_s": 11.0, "steady_items_per_s": None},
            "text": {"items_per_s": 50.0, "job_items_per_s": None, "steady_items_per_s": 95.0}}
    summary = bulk.throughput_summary(jobs, rates)
    assert summary["image"]["wall_over_bare"] == 0.9 and summary["image"]["job_over_bare"] == 1.0
    assert summary["text"]["wall_over_bare"] == 0.5 and summary["text"]["steady_over_bare"] == 0.95
    priority = bulk.priority_summary({"latency_ms": {"p50": 100.0, "p99": 200.0}, "requests_per_s": 10.0},
                                     {"latency_ms": {"p50": 120.0, "p99": 320.0}, "requests_per_s": 9.0})
    assert priority["p99_ratio"] == 1.6 and priority["p50_ratio"] == 1.2 and priority["requests_per_s_ratio"] == 0.9
    report = {"throughput": {"summary": summary}, "priority": {"summary": priority}}
    met = bulk.goals(report)
    assert met["image_throughput_over_bare"]["met"] is True and met["text_throughput_over_bare"]["met"] is False
    assert met["online_p99_with_over_without"]["met"] is False
    assert met["memory_peak_large_over_small"]["met"] is None  # not measured


def test_the_printed_table_has_every_part_and_the_goals():
    polls = _polls((0.5, "in_progress", 0, 0), (2.0, "in_progress", 8, 0), (3.0, "in_progress", 24, 0),
                   (3.5, "completed", 32, 0))
    batch = {"status": "completed", "request_counts": {"completed": 32, "failed": 0}, "in_progress_at": 1,
             "completed_at": 4}
    jobs = {"image": bulk.batch_timing(polls, batch, 32)}
    window = {"latency_ms": {"p50": 100.0, "p99": 150.0}, "requests_per_s": 10.0, "ok": 100, "errors": {}}
    loaded = {"latency_ms": {"p50": 110.0, "p99": 180.0}, "requests_per_s": 9.0, "ok": 90, "errors": {"503": 1}}
    batch_seen = {"lines": 500, "covered_window": True, "images_per_s_during_window": 7.5,
                  "final_status": "cancelled"}
    slower = {**loaded, "latency_ms": {"p50": 150.0, "p99": 300.0}}
    rounds = [{"without": window, "with_batch": w, "summary": bulk.priority_summary(window, w), "batch": batch_seen}
              for w in (loaded, slower, loaded)]
    row = {"lines": 100, "timing": bulk.batch_timing(polls, batch, 100), "runner_before_mib": 300.0,
           "runner_peak_mib": 320.0, "runner_growth_mib": 20.0, "job_processes_peak_mib": 900.0,
           "runner_plus_job_peak_mib": 1220.0, "job_processes": 3}
    report = {
        "throughput": {"jobs": jobs, "summary": bulk.throughput_summary(jobs, {"image": 10.0})},
        "priority": {"online_payload": {"kind": "image"}, "concurrency": None, "rate": 3.0, "niceness": 10,
                     "idle": True, "preprocess_concurrency": 1, "rounds": rounds,
                     "cpu_s_by_title": {"without_1": {"ray::ServeReplica:clip:OpenAIIngress": 9.0},
                                        "with_batch_1": {"ray::MapWorker(MapBatches(LineEncode))": 12.25}},
                     "summary": bulk.rounds_summary([r["summary"] for r in rounds])},
        "memory": {"rows": [row, {**row, "lines": 500}], "summary": bulk.memory_summary([row, {**row, "lines": 500}])},
    }
    report["goals"] = bulk.goals(report)
    table = bulk.bulk_table(report)
    assert "0.914" in table  # 32 images in 3.5 s over bare's 10/s
    # the median of the rounds' p99 ratios (1.2, 2.0, 1.2)
    assert "p99 with/without, median of 3 round(s): 1.2x" in table and "[1.2, 2.0, 1.2]" in table
    assert "3.0 req/s open loop" in table and "SCHED_IDLE" in table
    assert "ran through the window" in table and "503: 1" in table
    assert "together 1.0x" in table
    assert "CPU s by process, with batch 1: MapWorker(MapBatches(LineEncode)) 12.2" in table
    assert [g["met"] for g in report["goals"].values()] == [True, None, True, True]


def test_priority_batch_lines_outlast_the_window():
    assert bulk.priority_lines(10.0, 20.0, 2.0, cap=5000) == 480  # 1.5 x 10/s x 32 s
    assert bulk.priority_lines(1000.0, 20.0, 2.0, cap=5000) == 5000
    assert bulk.priority_lines(None, 20.0, 2.0, cap=300) == 300
    assert bulk.priority_lines(0.1, 1.0, 0.0, cap=5000) == 64


def test_process_roles_from_ray_process_titles():
    assert bulk.process_role("ray::ServeReplica:clip:BatchRunner") == "runner"
    assert bulk.process_role("ray::MapWorker(MapBatches(LinePreprocess))") == "job"
    assert bulk.process_role("ray::MapWorker(MapBatches(LineEncode))") == "job"
    assert bulk.process_role("ray::ReadParquet->SplitBlocks(4)") == "job"
    assert bulk.process_role("ray::_StatsActor.update_execution_metrics") == "job"  # Ray Data's own
    for other in ("ray::ServeReplica:clip:ClipEncoder-bench", "ray::IDLE", "ray::ServeController",
                  "ray::ProxyActor", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::HAProxyManager",
                  "/venv/bin/python serve run", "/ray/core/src/ray/raylet/raylet --x"):
        assert bulk.process_role(other) is None, other


def test_peaks_take_each_sample_s_sum_and_the_largest():
    peaks = bulk.Peaks()
    mib = 2**20
    runner, encode = "ray::ServeReplica:clip:BatchRunner", "ray::MapWorker(MapBatches(LineEncode))"
    peaks.add([(1, runner, 300 * mib, 10.0), (2, encode, 500 * mib, 1.0),
               (3, "ray::MapWorker(MapBatches(LinePreprocess))", 200 * mib, 2.0), (4, "ray::IDLE", 900 * mib, 0.5)],
              t=0.1)
    peaks.add([(1, runner, 350 * mib, 12.5), (2, encode + ".submit", 600 * mib, 4.0),
               (5, "ray::MapWorker(MapBatches(LineEncode)).__init__", 100 * mib, 0.75)], t=1.5)
    out = peaks.to_dict()
    assert out["runner_peak_mib"] == 350.0 and out["job_processes_peak_mib"] == 700.0
    assert out["runner_plus_job_peak_mib"] == 1050.0 and out["job_processes"] == 3 and out["samples"] == 2
    assert out["by_title_peak_mib"] == {encode: 600.0, "ray::MapWorker(MapBatches(LinePreprocess))": 200.0}
    # processes already there at the first sample, as they were, are not "first seen"
    assert out["first_seen_s"] == {encode + ".submit": 1.5, "ray::MapWorker(MapBatches(LineEncode)).__init__": 1.5}
    # CPU from the first sample on; a new process's whole CPU
    assert out["cpu_s_by_title"] == {encode: 3.75, "ray::ServeReplica:clip:BatchRunner": 2.5}


def test_process_titles_lose_the_method_and_the_timeline_orders_the_stages():
    assert bulk.process_title("ray::MapWorker(MapBatches(LineEncode)).submit") == \
        "ray::MapWorker(MapBatches(LineEncode))"
    assert bulk.process_title("ray::_StatsActor.update_execution_metrics") == "ray::_StatsActor"
    assert bulk.process_title("ray::ListFiles") == "ray::ListFiles"
    assert bulk.process_title("/venv/lib/ray/core/src/ray/raylet/raylet --foo") == "raylet"
    seen = {"ray::ListFiles": 0.4, "ray::ReadFilesParquetV2": 0.9,
            "ray::MapWorker(MapBatches(LinePreprocess)).__init__": 2.0,
            "ray::MapWorker(MapBatches(LineEncode)).__init__": 2.2, "ray::MapWorker(MapBatches(LinePreprocess))": 9.0,
            "ray::MapWorker(MapBatches(LineEncode)).submit": 12.5, "ray::MapWorker(MapBatches(LineEncode))": 12.0}
    assert bulk.stage_timeline(seen) == {"read": 0.4, "preprocess_init": 2.0, "encode_init": 2.2,
                                         "preprocess_working": 9.0, "encode_working": 12.0}
    assert bulk.stage_timeline({}) == dict.fromkeys(bulk.stage_timeline(seen))


def test_memory_summary_compares_the_largest_file_with_the_smallest():
    rows = [{"lines": 50_000, "runner_peak_mib": 440.0, "job_processes_peak_mib": 1000.0,
             "runner_plus_job_peak_mib": 1440.0, "runner_growth_mib": 40.0},
            {"lines": 10_000, "runner_peak_mib": 400.0, "job_processes_peak_mib": 1000.0,
             "runner_plus_job_peak_mib": 1400.0, "runner_growth_mib": 20.0}]
    summary = bulk.memory_summary(rows)
    assert summary["lines"] == [10_000, 50_000] and summary["runner_peak_ratio"] == 1.1
    assert summary["job_processes_peak_ratio"] == 1.0 and summary["total_peak_ratio"] == round(1440 / 1400, 3)
    assert summary["runner_growth_mib"] == [20.0, 40.0]
    assert bulk.memory_summary(rows[:1]) == {}


def test_the_service_runs_the_batch_api_with_the_benchmarks_job_stages(tmp_path):
    settings = _settings("--niceness", "7", "--preprocess-concurrency", "2", "--lines", "100,60000")
    args = bulk.app_args(settings, "ViT-B-32", "random", tmp_path)
    from serve_app.config import AppArgs

    app = AppArgs.model_validate(args)
    assert app.layout == "one-process" and app.batch.enabled and app.batch.storage == str(tmp_path / "store")
    assert app.batch.job.niceness == 7 and app.batch.job.preprocess_concurrency == 2
    assert app.batch.max_requests_per_file == 60_000 and app.batch.max_inputs_per_batch == 60_000
    assert str(tmp_path) in app.tenancy.database_url
    # encoder 0.5 + runner 0.25 + 2 x 0.25 preprocessing + 0.5 encoder actor + 0.25 read
    assert app.batch.job.encoder_cpus == settings.threads  # the job's encoder threads: bare's
    # encoder 0.5 + runner 0.25 + 2 preprocessing actors of 0.25 + the job's encoder + a read task of 0.25
    assert bulk.reserved_cpus(args) == pytest.approx(1.5 + settings.threads)
