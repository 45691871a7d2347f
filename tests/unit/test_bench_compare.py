"""serve_app.bench.compare without servers: bracketed ratios, bare beside each idle server, the latency over
bare at c=1, and the args our service is started with. No targets: compare reports ratios only."""

import pytest


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
    flat = " ".join(text.split())
    assert "| image | 8 | ours | 13.50 | 0.90 |" in flat  # items/s, × bare
    # p50 at c=1 over the bare batch-1 pass's p50 (100 ms in both bracketing bare runs)
    assert "| image | ours | 110.0 | 100.0 | 10.0 |" in flat
    assert "target" not in text.lower() and "| met |" not in flat  # ratios only, no hard-coded targets


def test_compare_reports_bare_beside_each_idle_server():
    from serve_app.bench.compare import compare_tables, idle_rows

    idle = {(r["system"], r["concurrency"]): r for r in idle_rows(_fake_result())}
    assert set(idle) == {("ours", 1), ("ours", 8)}  # naive has no such run in this result
    # beside idle ours: 12 images/s at batch 8, against ours' bracketing bare runs' mean of 15
    assert idle[("ours", 8)]["x_bare"] == pytest.approx(12 / 15)
    assert idle[("ours", 1)]["x_bare"] == pytest.approx(6 / 7.5)
    assert "| image | 8 | ours | 12.00 | 0.80 |" in " ".join(compare_tables(_fake_result()).split())


def test_compare_reports_ratios_for_each_layout_of_ours():
    from serve_app.bench.compare import compare_rows, compare_tables

    result = _fake_result()
    result["served"]["ours-1p"] = {"bare_before": 1, "bare_after": 2,
                                   "modalities": {"image": [level_dict(1, 7.0, 105.0), level_dict(8, 14.0, 450.0)]}}
    rows = {(r["system"], r["concurrency"]): r for r in compare_rows(result)}
    assert rows[("ours-1p", 8)]["x_bare"] == pytest.approx(14.0 / 15)
    assert rows[("ours-1p", 8)]["x_ours"] == pytest.approx((14.0 / 15) / (13.5 / 15))
    text = compare_tables(result)
    flat = " ".join(text.split())
    assert "| image | 8 | ours | 13.50 | 0.90 |" in flat
    assert "| image | 8 | ours-1p | 14.00 | 0.93 |" in flat
    assert "| image | ours-1p | 105.0 | 100.0 | 5.0 |" in flat
    assert "× ours-1p" in text


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
