"""The Batch API's warm stages (serve_app/batch/pipeline.py) on a local Ray: batches one after another through one
Ray Data execution, with the tiny model.

- Two batches run on the same stage actors (started once), with open_clip's own vectors.
- A batch stopped early (a cancel) leaves rows in flight: none of them reach the next batch's output.
- Closing the stages stops their actors.

One subprocess with a local Ray of its own (2 CPUs), as test_dataset_embed.py: the session's Serve app may hold a
Ray instance in this process.
"""

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import encode, random_image
from tests.integration.test_api import assert_same, expected_image, expected_text

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
import io, json, os, re, sys
import pyarrow.parquet as pq
import ray
from pyarrow import fs

from serve_app.batch.job import Outcome, execute, plan_schema, validate
from serve_app.batch.pipeline import StagePipeline
from tests.unit.test_batch_job import make_spec

args = json.loads(open(sys.argv[1]).read())
ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
spec = make_spec(__import__("pathlib").Path(args["model_dir"]), max_inputs=256,
                 job={"batch_size": 4, "encoder_cpus": 0.5, "preprocess_concurrency": 1, "preprocess_cpus": 0.5})
filesystem = fs.LocalFileSystem()


def plan(name, lines):
    path = f"{args['workdir']}/{name}.parquet"
    with filesystem.open_output_stream(path) as out:
        writer = pq.ParquetWriter(out, plan_schema())
        validated = validate(iter(line.encode() for line in lines), spec, writer, io.BytesIO())
        writer.close()
    assert not validated.errors, validated.errors
    return path, validated


def stage_actors():
    # (stage, pid) of each live process of a stage's actor: Ray titles them `ray::MapWorker(MapBatches(...))`
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError):
            continue
        match = re.search(r"MapWorker\(MapBatches\((\w+)\)\)", title)
        if match:
            found.append((match.group(1), int(entry)))
    return sorted(found)


def run(stages, name, stop_after_blocks=None):
    path, validated = plan(name, args["plans"][name])
    output, errors = io.BytesIO(), io.BytesIO()
    outcome = Outcome()
    blocks = {"n": 0}
    if stop_after_blocks is not None:
        import serve_app.batch.job as job

        write = job._write_lines

        def counting(*a, **k):
            blocks["n"] += 1
            return write(*a, **k)

        job._write_lines = counting
    try:
        execute(stages, path, filesystem, output, errors,
                lambda: "cancelling" if stop_after_blocks is not None and blocks["n"] >= stop_after_blocks else None,
                outcome)
    finally:
        if stop_after_blocks is not None:
            job._write_lines = write
    return {"output": [json.loads(x) for x in output.getvalue().splitlines()],
            "errors": [json.loads(x) for x in errors.getvalue().splitlines()],
            "completed": outcome.completed, "failed": outcome.failed, "stopped": outcome.stopped,
            "images": outcome.images, "input_tokens": outcome.input_tokens}


stages = StagePipeline(spec, spec.models[0].name)
result = {"first": run(stages, "first")}
result["actors_after_first"] = stage_actors()
result["stopped"] = run(stages, "stopped", stop_after_blocks=1)
result["after_stop"] = run(stages, "after_stop")
result["actors_after_all"] = stage_actors()
result["closed"] = stages.close()
import time
deadline = time.monotonic() + 30
while time.monotonic() < deadline and stage_actors():
    time.sleep(0.2)
result["actors_after_close"] = stage_actors()
ray.shutdown()
print("RESULT " + json.dumps(result))
"""

TEXTS = ["a red bicycle", "two dogs on a beach", "a photo of a cat", "green leaves"]


def _line(custom_id: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body})


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [encode(random_image(40 + 9 * i, 30 + 5 * i, seed=500 + i), "PNG") for i in range(3)]


@pytest.fixture(scope="module")
def result(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, images: list[bytes]) -> dict:
    workdir = tmp_path_factory.mktemp("stages")
    data = [base64.b64encode(raw).decode() for raw in images]
    plans = {
        # texts and images, a line of several inputs, a line with a bad image (its own error)
        "first": [_line(f"t{i}", {"input": text}) for i, text in enumerate(TEXTS)]
        + [_line("pair", {"input": TEXTS[:2]}), _line("i0", {"input": [{"image": data[0]}]}),
           _line("bad", {"input": [{"image": base64.b64encode(b"not an image").decode()}]}),
           # more images than a row group holds: the line is cut between two groups and put together again
           _line("wide", {"input": [{"image": data[1]}] * 140})],
        # two row groups (1,024 texts a group): stopped after the first comes back
        "stopped": [_line(f"s{i}", {"input": f"caption number {i}"}) for i in range(1500)],
        "after_stop": [_line(f"n{i}", {"input": text}) for i, text in enumerate(TEXTS)]
        + [_line(f"ni{i}", {"input": [{"image": d}]}) for i, d in enumerate(data)],
    }
    args = {"model_dir": str(tiny_model_dir), "workdir": str(workdir), "plans": plans}
    (workdir / "args.json").write_text(json.dumps(args))
    done = subprocess.run([sys.executable, "-c", DRIVER, str(workdir / "args.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


def _vectors(run: dict) -> dict[str, list[np.ndarray]]:
    return {line["custom_id"]: [np.asarray(d["embedding"], dtype=np.float32)
                                for d in line["response"]["body"]["data"]] for line in run["output"]}


def test_a_batch_through_the_stages_has_open_clips_vectors(result: dict, reference, images) -> None:
    first = result["first"]
    vectors = _vectors(first)
    assert (first["completed"], first["failed"], first["stopped"]) == (7, 1, None)
    for i, text in enumerate(TEXTS):
        assert_same(vectors[f"t{i}"][0], expected_text(reference, text))
    assert [len(v) for v in vectors["pair"]] and len(vectors["pair"]) == 2
    assert_same(vectors["pair"][1], expected_text(reference, TEXTS[1]))
    assert_same(vectors["i0"][0], expected_image(reference, images[0]))
    wide = vectors["wide"]
    assert len(wide) == 140
    for vector in (wide[0], wide[127], wide[128], wide[139]):
        assert_same(vector, expected_image(reference, images[1]))
    (bad,) = first["errors"]
    assert bad["custom_id"] == "bad" and bad["response"]["status_code"] == 400
    assert first["images"] == 141  # the bad image is not billed


def test_the_next_batch_runs_on_the_same_actors(result: dict) -> None:
    started = result["actors_after_first"]
    assert sorted(name for name, _ in started) == ["LineEncode", "LinePreprocess"], started
    assert result["actors_after_all"] == started  # no actor started (or died) for the later batches


def test_rows_of_a_stopped_batch_never_reach_the_next_one(result: dict, reference, images) -> None:
    stopped = result["stopped"]
    assert stopped["stopped"] == "cancelling" and 0 < stopped["completed"] < 1500
    after = result["after_stop"]
    vectors = _vectors(after)
    assert sorted(vectors) == sorted([f"n{i}" for i in range(len(TEXTS))] + [f"ni{i}" for i in range(3)])
    assert (after["completed"], after["failed"], after["stopped"]) == (7, 0, None)
    for i, text in enumerate(TEXTS):
        assert_same(vectors[f"n{i}"][0], expected_text(reference, text))
    for i, raw in enumerate(images):
        assert_same(vectors[f"ni{i}"][0], expected_image(reference, raw))


def test_closing_the_stages_stops_their_actors(result: dict) -> None:
    assert result["closed"] and result["actors_after_close"] == []
