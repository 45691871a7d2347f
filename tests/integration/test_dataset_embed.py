"""`clip-embed` on Ray Data with the tiny model: a folder of images, a Parquet file and a WebDataset tar, each with a
corrupt image; vectors against open_clip's own (cos >= 0.9999 per row), ids, metadata and failed rows.

The jobs run in one Python subprocess that starts its own local Ray (2 CPUs) once and calls the CLI's `main()` for
each job: the session's Serve app (`serve_url`) may hold a Ray instance in this process, whose free CPUs depend on
what other tests left deployed, and a Ray Data job that cannot place its actors waits forever. One Ray start for
all jobs keeps the module fast; its own Ray keeps it independent of the test order.
"""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import encode, random_image
from tests.integration.test_api import assert_same, expected_image, expected_text

ROOT = Path(__file__).resolve().parents[2]
# A JPEG cut short: its header reads, its data does not decode.
_WHOLE_JPEG = encode(random_image(64, 48, seed=7), "JPEG")
CORRUPT_JPEG = _WHOLE_JPEG[: len(_WHOLE_JPEG) // 2]

DRIVER = """
import json, sys, time
import ray
from serve_app.batch.cli import main

ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
codes = []
for argv in json.loads(sys.argv[1]):
    deadline = time.monotonic() + 30  # the last job's actors give their CPUs back
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    codes.append(main(argv))
ray.shutdown()
print("CODES " + json.dumps(codes))
"""


def _images(count: int, seed: int) -> list[bytes]:
    """Small images of different sizes, formats and aspect ratios."""
    formats = ["PNG", "JPEG", "WEBP"]
    return [encode(random_image(40 + 13 * i, 30 + 7 * i, seed=seed + i), formats[i % 3]) for i in range(count)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("datasets")
    folder = root / "folder"
    (folder / "nested" / "deeper").mkdir(parents=True)
    folder_images = {}
    for i, raw in enumerate(_images(4, seed=100)):
        name = ["a.png", "nested/b.jpg", "nested/deeper/c.webp", "d.png"][i]
        (folder / name).write_bytes(raw)
        folder_images[name] = raw
    (folder / "nested" / "broken.jpg").write_bytes(CORRUPT_JPEG)
    (folder / "README.txt").write_text("not an image: skipped by extension")

    parquet_images = _images(3, seed=200) + [CORRUPT_JPEG]
    captions = ["a red bicycle", "two dogs on a beach", "", "a photo of a cat"]
    skus = ["sku-1", "sku-2", "sku-3", "sku-4"]
    table = pa.table({"image": pa.array(parquet_images, type=pa.binary()), "caption": captions, "sku": skus,
                      "price": pa.array([9.5, None, 3.0, 1.25], type=pa.float64())})
    pq.write_table(table, root / "catalog.parquet")

    shard = root / "shards"
    shard.mkdir()
    samples = {"s000": (_images(1, seed=300)[0], "jpg", "a lighthouse at dusk"),
               "s001": (CORRUPT_JPEG, "jpg", "broken on purpose"),
               "s002": (encode(random_image(70, 50, seed=301), "PNG"), "png", "green leaves")}
    with tarfile.open(shard / "shard-000.tar", "w") as tar:
        for key, (raw, ext, text) in samples.items():
            for name, data in ((f"{key}.{ext}", raw), (f"{key}.txt", text.encode()),
                               (f"{key}.json", json.dumps({"n": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"root": root, "folder": folder, "folder_images": folder_images, "parquet": root / "catalog.parquet",
            "parquet_images": dict(zip(skus, parquet_images)), "captions": dict(zip(skus, captions)),
            "shards": shard, "samples": samples}


@pytest.fixture(scope="module")
def jobs(sources: dict, tiny_model_dir: Path) -> dict:
    """Every job of the module in one subprocess: {name: (exit code, summary, output rows by id)}. Texts go through
    the same two stages, tested in-process below (each job here costs two actors' start: torch, open_clip)."""
    root = sources["root"]
    model = ["--model", f"local-dir:{tiny_model_dir}", "--batch-size", "4", "--encoder-cpus", "0.5"]
    argv = {
        "folder": [str(sources["folder"]), str(root / "out-folder")],
        "parquet-images": [str(sources["parquet"]), str(root / "out-pq-images"), "--id-column", "sku"],
        "webdataset": [str(sources["shards"]), str(root / "out-wds")],
        "missing": [str(root / "no-such-dir"), str(root / "out-missing")],
    }
    runs = [[*args, *model, "--summary-json", str(root / f"{name}.json")] for name, args in argv.items()]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    codes = json.loads(done.stdout.rsplit("CODES ", 1)[1])
    results = {}
    for (name, args), code in zip(argv.items(), codes):
        summary_path = root / f"{name}.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        rows = {}
        if code == 0:
            rows = {row["id"]: row for row in pq.read_table(args[1]).to_pylist()}
        results[name] = (code, summary, rows)
    results["stdout"] = done.stdout
    results["stderr"] = done.stderr
    return results


def _vector(row: dict) -> np.ndarray:
    return np.asarray(row["embedding"], dtype=np.float32)


def test_folder_of_images(jobs: dict, sources: dict, reference):
    code, summary, rows = jobs["folder"]
    assert code == 0
    assert set(rows) == {*sources["folder_images"], "nested/broken.jpg"}  # ids: paths under the folder, recursively
    for name, raw in sources["folder_images"].items():
        assert rows[name]["error"] is None
        assert_same(_vector(rows[name]), expected_image(reference, raw))
    assert rows["nested/broken.jpg"]["embedding"] is None
    assert "truncated or corrupt" in rows["nested/broken.jpg"]["error"]
    assert list(rows["a.png"]) == ["id", "embedding", "error"]
    assert summary["rows"] == 5 and summary["embedded"] == 4 and summary["failed"] == 1
    assert summary["first_failed"] == [{"id": "nested/broken.jpg", "error": rows["nested/broken.jpg"]["error"]}]
    assert summary["failed_by_reason"] == {rows["nested/broken.jpg"]["error"]: 1}
    assert "5 rows" in jobs["stdout"] and "1 failed" in jobs["stdout"]


def test_parquet_images_carry_metadata(jobs: dict, sources: dict, reference):
    code, summary, rows = jobs["parquet-images"]
    assert code == 0
    assert set(rows) == set(sources["parquet_images"])  # --id-column sku
    for sku, raw in sources["parquet_images"].items():
        row = rows[sku]
        assert row["sku"] == sku and row["caption"] == sources["captions"][sku]  # metadata as it came
        if raw == CORRUPT_JPEG:
            assert row["embedding"] is None and "truncated or corrupt" in row["error"]
        else:
            assert row["error"] is None
            assert_same(_vector(row), expected_image(reference, raw))
    assert rows["sku-2"]["price"] is None and rows["sku-1"]["price"] == 9.5
    assert "image" not in rows["sku-1"]  # the image bytes are not copied to the output
    assert summary["kind"] == "images" and summary["failed"] == 1


def test_webdataset(jobs: dict, sources: dict, reference):
    code, summary, rows = jobs["webdataset"]
    assert code == 0
    assert set(rows) == set(sources["samples"])  # ids: the sample keys
    for key, (raw, _, text) in sources["samples"].items():
        row = rows[key]
        assert row["txt"] == text and json.loads(row["json"]) == {"n": key} and row["shard"].endswith(".tar")
        if raw == CORRUPT_JPEG:
            assert row["embedding"] is None and "truncated or corrupt" in row["error"]
        else:
            assert row["error"] is None
            assert_same(_vector(row), expected_image(reference, raw))
    assert summary["rows"] == 3 and summary["failed"] == 1


def test_fatal_errors_exit_non_zero(jobs: dict):
    code, summary, _ = jobs["missing"]
    assert code == 1 and summary is None
    assert "no such file or directory" in jobs["stderr"]


# ------------------------------------------------------------------ the two stages in-process (no Ray cluster)


@pytest.fixture(scope="module")
def stages(tiny_model_dir: Path):
    from serve_app.batch.dataset import Encode
    from serve_app.config import ModelSpec

    spec = ModelSpec(model=f"local-dir:{tiny_model_dir}", torch_threads=1)
    return spec, {"images": Encode(spec, "images"), "texts": Encode(spec, "texts")}


def _run_stages(stages, kind: str, table: pa.Table, **settings) -> dict:
    from serve_app.batch.dataset import EmbedSettings, Preprocess

    spec, encoders = stages
    column = "image" if kind == "images" else "text"
    out = encoders[kind](Preprocess(spec, kind, column, EmbedSettings(**settings))(table))
    assert out.column_names[:2] == ["id", "embedding"] and out.column_names[-1] == "error"
    return {row["id"]: row for row in out.to_pylist()}


def test_image_rows_fail_alone_for_what_the_service_refuses(stages, reference, tmp_path: Path):
    """Bytes, paths (only where allowed, relative ones under the base) and URLs (refused with the policy off): every
    bad row gets its reason, the good ones the reference vector."""
    good = encode(random_image(50, 40, seed=11), "PNG")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "on-disk.png").write_bytes(good)
    rows = {"bytes": good, "empty": b"", "none": None, "path": "pics/on-disk.png", "url": "https://example.com/a.png",
            "big": encode(random_image(300, 300, seed=12), "PNG")}
    # a column holds bytes, or strings (paths and URLs): the rows of the other form are null in each
    raw = pa.table({"id": list(rows), "image": pa.array([None if isinstance(v, str) else v for v in rows.values()],
                                                        type=pa.binary())})
    mixed = pa.table({"id": list(rows), "image": [v if isinstance(v, str) else None for v in rows.values()]})
    limits = {"max_image_bytes": len(good) + 100}
    by_bytes = _run_stages(stages, "images", raw, image_limits=limits)
    assert_same(np.asarray(by_bytes["bytes"]["embedding"], dtype=np.float32), expected_image(reference, good))
    assert by_bytes["empty"]["error"] == "image is empty" and by_bytes["none"]["error"] == "no image in this row"
    assert "byte limit" in by_bytes["big"]["error"] and by_bytes["big"]["embedding"] is None
    assert "image" not in by_bytes["bytes"]  # a column of bytes is not carried
    refused = _run_stages(stages, "images", mixed, image_limits=limits)
    assert "paths are not read" in refused["path"]["error"]
    assert "image_url_policy off" in refused["url"]["error"]
    allowed = _run_stages(stages, "images", mixed, image_limits=limits, allow_paths=True, path_base=str(tmp_path))
    assert allowed["path"]["error"] is None and allowed["path"]["image"] == "pics/on-disk.png"  # paths are carried
    assert_same(np.asarray(allowed["path"]["embedding"], dtype=np.float32), expected_image(reference, good))
    missing = _run_stages(stages, "images", pa.table({"id": ["x"], "image": ["pics/none.png"]}), allow_paths=True,
                          path_base=str(tmp_path))
    assert missing["x"]["error"] == "image file not found"


def test_image_urls_are_fetched_under_the_policy(stages, reference):
    """An allow-listed host is fetched by the service's own fetcher; a host not on the list fails its row."""
    import http.server
    import threading

    good = encode(random_image(64, 64, seed=13), "JPEG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(good)))
            self.end_headers()
            self.wfile.write(good)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        table = pa.table({"id": ["ok", "other"], "image": [f"http://127.0.0.1:{port}/a.jpg",
                                                           f"http://localhost:{port}/a.jpg"]})
        rows = _run_stages(stages, "images", table, image_url_policy=[f"127.0.0.1:{port}"])
    finally:
        server.shutdown()
    assert rows["ok"]["error"] is None
    assert_same(np.asarray(rows["ok"]["embedding"], dtype=np.float32), expected_image(reference, good))
    assert "allow-list" in rows["other"]["error"] and rows["other"]["embedding"] is None


def test_text_rows_fail_alone(stages, reference):
    texts = {"good": "a diagram of a bridge", "empty": "", "none": None, "long": "x" * 50}
    rows = _run_stages(stages, "texts", pa.table({"id": list(texts), "text": list(texts.values()), "n": [1, 2, 3, 4]}),
                       limits={"max_text_chars": 40})
    assert_same(np.asarray(rows["good"]["embedding"], dtype=np.float32), expected_text(reference, texts["good"]))
    assert rows["good"]["text"] == texts["good"] and rows["good"]["n"] == 1  # the text and metadata are carried
    assert "empty" in rows["empty"]["error"] and rows["none"]["error"] == "no text in this row"
    assert "the limit is 40" in rows["long"]["error"]


def test_preprocessing_pool_fits_the_free_cpus():
    """Actors hold their CPUs for the whole job: the pool leaves TASK_CPUS for reads and writes, shrinks to one
    fractional actor on a small machine, and says at once when nothing is left, instead of waiting forever."""
    from serve_app.batch.dataset import EmbedSettings, preprocess_pool

    assert preprocess_pool(EmbedSettings(), free_cpus=8) == ((1, 6), 1.0)
    assert preprocess_pool(EmbedSettings(encoder_cpus=0.5), free_cpus=2) == (1, 0.5)
    assert preprocess_pool(EmbedSettings(preprocess_concurrency=3), free_cpus=1) == (3, 1.0)
    with pytest.raises(ValueError, match="lower --encoder-cpus"):
        preprocess_pool(EmbedSettings(), free_cpus=2)


def test_source_columns_and_ids():
    """Which column a source embeds, and the ids of a Parquet source without an id column: a hash of the file and
    the row's position (Ray Data's `row_hash`), stable across runs."""
    from serve_app.batch.sources import SourceError, _parquet_ids, _pick_kind

    assert _pick_kind("auto", "image", "caption", []) == ("images", "image")
    assert _pick_kind("auto", None, "caption", []) == ("texts", "caption")
    assert _pick_kind("texts", "image", "caption", []) == ("texts", "caption")
    with pytest.raises(SourceError, match="--text-column"):
        _pick_kind("texts", "image", None, ["image", "sku"])
    table = pa.table({"sku": [7, 8], "row_hash": pa.array([1, 2**64 - 1], type=pa.uint64())})
    hashed = _parquet_ids(table, None)
    assert hashed.column_names == ["id", "sku"] and hashed.column("id").to_pylist() == [
        "0000000000000001", "ffffffffffffffff"]
    named = _parquet_ids(table.drop_columns(["row_hash"]), "sku")
    assert named.column("id").to_pylist() == ["7", "8"] and named.column("sku").to_pylist() == [7, 8]
