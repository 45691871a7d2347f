"""serve_app.bench.gpu on the CPU with the tiny model (the served part off: no Ray here)."""

import json
from pathlib import Path

import pytest


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
