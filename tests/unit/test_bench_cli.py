"""serve_app.bench.cli in-process, without a server: `bare` and `gpu --smoke --no-served` write their JSON
and tables."""

import json
from pathlib import Path

from serve_app.bench.cli import main


def test_cli_bare_writes_json(tiny_model_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "bare.json"
    main(["bare", "--model", f"local-dir:{tiny_model_dir}", "--pretrained", "", "--threads", "1",
          "--image-batches", "2", "--text-batches", "2", "--min-seconds", "0", "--image-size", "64x48", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["tool"] == "clip-bench bare" and report["machine"]["cpus"] >= 1
    assert [(r["modality"], r["batch"]) for r in report["results"]] == [("image", 2), ("text", 2)]
    assert "items/s" in capsys.readouterr().out


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
