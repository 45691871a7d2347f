"""`clip-bench soak`'s memory summary over synthetic samples: per replica process, after the warm-up."""

from serve_app.bench.soak import memory_summary, soak_table


def test_memory_is_summarised_per_replica_process_after_the_warm_up():
    samples = [
        {"t": 0, "replicas": {"11": {"replica": "clip:ClipEncoder-bench", "rss_mib": 500.0}}},
        {"t": 60, "replicas": {"11": {"replica": "clip:ClipEncoder-bench", "rss_mib": 1000.0},
                               "12": {"replica": "clip:Preprocessor", "rss_mib": 400.0}}},
        {"t": 75, "replicas": {"11": {"replica": "clip:ClipEncoder-bench", "rss_mib": 1050.0},
                               "12": {"replica": "clip:Preprocessor", "rss_mib": 400.0}}},
    ]
    rows = memory_summary(samples, warmup_s=60)
    assert rows == [
        {"replica": "clip:ClipEncoder-bench", "pid": 11, "samples": 2, "first_mib": 1000.0, "min_mib": 1000.0,
         "max_mib": 1050.0, "spread": 0.05},
        {"replica": "clip:Preprocessor", "pid": 12, "samples": 2, "first_mib": 400.0, "min_mib": 400.0,
         "max_mib": 400.0, "spread": 0.0},
    ]
    load = {"concurrency": 2, "window_s": 600, "items_per_s": 3.0, "latency_ms": {"p50": 1, "p99": 2}, "ok": 9,
            "errors": {}}
    assert "5.0 %" in soak_table({"memory": rows, "load": {"image": load}})
