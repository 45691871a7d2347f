"""The hostile corpus (serve_app/bench/hostile.py) against the session app, concurrently with good traffic:
every hostile request answered as expected within a bounded time, every good request's vectors right, the
ingress's event loop answering `/livez` throughout, and no replica's memory growing with the corpus."""

import os

from serve_app.bench.hostile import HostileSettings, Limits, hostile_table, run_corpus
from serve_app.bench.report import replica_rss
from tests.conftest import TINY_NAME, app_args, driver_handle

BOUND_S = 15.0  # a shared 2-core machine; the classes' own worst times are in the report (BENCHMARKS.md)
LIVEZ_BOUND_S = 1.0


def test_hostile_corpus_beside_good_traffic(serve_url, tiny_model_dir, second_model_dir):
    limits = Limits.of(app_args(tiny_model_dir, second_model_dir))
    loops = {name: driver_handle(name) for name in ("OpenAIIngress", "Preprocessor")}
    for handle in loops.values():
        handle.loop_lag.remote(reset=True).result()
    report = run_corpus(serve_url, TINY_NAME, limits, HostileSettings(requests=1000, concurrency=6),
                        rss=lambda: replica_rss(os.getpid()))
    print(hostile_table(report))
    lags = {name: handle.loop_lag.remote().result() for name, handle in loops.items()}
    print("event loop lag:", lags)
    for name, lag in lags.items():  # the loop's own work, not the machine's scheduling (serve_app/loop_lag.py)
        assert lag["samples"] > 100 and lag["worst_blocked_s"] < 0.1, (name, lag)
    for name, result in report["classes"].items():
        assert result["sent"] > 0 and not result["unexpected"], (name, result)
        assert result["worst_s"] < BOUND_S, (name, result)
    good = report["good"]
    assert good["ok"] > 0 and good["wrong_vectors"] == 0 and good["errors"] == 0, good
    live = report["livez"]
    assert live["failures"] == 0 and live["worst_s"] < LIVEZ_BOUND_S, live
    assert not report["replicas_gone"]
    assert len(report["memory"]) >= 4  # ingress, preprocessor, two encoders
    for replica in report["memory"]:
        assert replica["growth"] <= 0.10, replica
