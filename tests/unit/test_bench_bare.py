"""serve_app.bench.bare: the model in-process at several batch sizes (tiny random model, no server)."""

from pathlib import Path

from serve_app.bench.bare import BareModel, BareSettings, model_spec, reference, single_latency_ms


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
