"""`clip-bench prep`: preprocessing per core through the service's own code, with small sizes and a tiny model."""

import json
from pathlib import Path

from serve_app.bench.cli import main
from serve_app.bench.prep import DEFAULT_ENCODER_RATE, PrepSettings, prep_tables, run_prep


def test_prep_measures_every_size_format_path_and_thread_count(tiny_model_dir: Path):
    settings = PrepSettings(model=f"local-dir:{tiny_model_dir}", sizes=[(64, 48), (400, 300)], threads=[1, 2],
                            min_seconds=0.05, min_images=1, rounds=2, ingress=True)
    report = run_prep(settings)
    rows = {(r["format"], r["width"], r["decode"], r["threads"]): r for r in report["results"]}
    assert set(rows) == {(f, w, d, t) for f, d in (("jpeg", "exact"), ("jpeg", "fast"), ("png", "exact=fast"))
                         for w in (64, 400) for t in (1, 2)}
    assert all(r["images_per_s"] > 0 and len(r["rounds"]) == 2 for r in rows.values())
    one = rows[("jpeg", 400, "exact", 1)]
    assert one["cores_per_gpu"] == DEFAULT_ENCODER_RATE / one["images_per_cpu_s"]
    assert "scaling_vs_fewest_threads" in rows[("jpeg", 400, "exact", 2)]
    # the tiny model's 48 px input: fast decodes JPEGs to no less than 96 px a side, 400x300 at half scale
    assert report["draft_size"] == 96
    assert rows[("jpeg", 400, "fast", 1)]["decoded_size"] == [200, 150]
    assert rows[("jpeg", 64, "fast", 1)]["decoded_size"] == [64, 48]
    assert rows[("jpeg", 400, "fast", 1)]["difference_vs_exact"]["mean_abs"] < 0.015
    assert rows[("png", 400, "exact=fast", 1)]["decoded_size"] == [400, 300]
    assert "estimate" in report["encoder_rate_source"]
    (small, large) = report["ingress"]
    assert large["width"] == 400 and large["body_bytes"] > small["body_bytes"]
    assert large["collect_inputs_keeps_the_string"] and large["ingress_total_ms"] > 0
    assert large["exact_preprocess_ms_per_core"] == rows[("jpeg", 400, "exact", 1)]["cpu_ms_per_image"]
    tables = prep_tables(report)
    assert "cores/GPU @1000/s" in tables and "ingress ms" in tables


def test_cli_prep_writes_json(tiny_model_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "prep.json"
    main(["prep", "--model", f"local-dir:{tiny_model_dir}", "--sizes", "64x48", "--formats", "jpeg",
          "--min-seconds", "0", "--min-images", "1", "--rounds", "1", "--encoder-rate", "250", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["encoder_rate"] == 250 and report["encoder_rate_source"] == "--encoder-rate"
    assert [r["decode"] for r in report["results"]] == ["exact", "fast"]
    assert report["command"].startswith("clip-bench prep")
    assert "cores/GPU @250/s" in capsys.readouterr().out
