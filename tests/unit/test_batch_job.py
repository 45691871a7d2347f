"""A batch's input file checked line by line without Ray (serve_app/batch/job.py `validate`, `cost_bound`), the
files' store (serve_app/batch/store.py) on a local directory and on a real S3-compatible server (moto), and the
runner's side of validation (serve_app/batch/runner.py `BatchWork.run` up to where Ray Data would start).

A line's body that the online route refuses is answered in the error file with the online route's own answer;
the expected answers are written out here (message, type, param, code), as a client of /v1/embeddings sees them.
"""

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from serve_app.batch.job import (
    MAX_CUSTOM_ID_CHARS, JobSpec, Outcome, Validated, cost, cost_bound, plan_schema, validate,
)
from serve_app.batch.runner import job_spec
from serve_app.batch.store import CHUNK, FileStore, LineTooLong
from serve_app.config import BatchAPISettings, ImageLimits, ModelSpec, Price, RequestLimits, TenancySettings
from serve_app.protocol import LIST_LIMITS
from serve_app.tenancy.gate import token_bound
from tests.conftest import b64, data_uri, encode, random_image

NAME = "tiny-clip"
EMBED_DIM = 32  # serve_app.dev_model.TINY_MODEL_CFG
CONTEXT = 77
LIST_DEFAULTS = (LIST_LIMITS.inputs, LIST_LIMITS.labels, LIST_LIMITS.templates)
URL_OFF_MESSAGE = ("image URLs are not enabled on this server (image_url_policy is off): send the image inline as a "
                   "data: URI (data:image/jpeg;base64,...) or as bare base64")


def make_spec(model_dir: Path, *, url_policy: Any = "off", max_inputs: int = 64, tenancy: TenancySettings | None = None,
              limits: dict[str, Any] | None = None, **batch: Any) -> JobSpec:
    """The JobSpec a BatchRunner builds (runner.job_spec) for the tiny model."""
    return job_spec(BatchAPISettings(**batch), [ModelSpec(model=f"local-dir:{model_dir}", served_model_name=NAME)],
                    ImageLimits(), RequestLimits(**(limits or {})), url_policy, max_inputs,
                    tenancy or TenancySettings(), LIST_DEFAULTS)


@pytest.fixture(scope="module")
def spec(tiny_model_dir: Path) -> JobSpec:
    return make_spec(tiny_model_dir)


@pytest.fixture(autouse=True)
def _list_limits_restored():
    """validate() sets this process's list limits from its spec; put the defaults back after each test."""
    yield
    LIST_LIMITS.inputs, LIST_LIMITS.labels, LIST_LIMITS.templates = LIST_DEFAULTS


def req(custom_id: Any, body: Any = None, *, method: str = "POST", url: str = "/v1/embeddings",
        **fields: Any) -> bytes:
    """One input line (bytes, without its line break)."""
    line = {"custom_id": custom_id, "method": method, "url": url,
            "body": {"input": "a photo of a cat"} if body is None else body} | fields
    return json.dumps(line).encode()


def run(spec: JobSpec, lines: list[bytes]) -> tuple[Validated, list[dict[str, Any]], list[dict[str, Any]]]:
    """validate() as the runner calls it: (its result, the plan's rows, the error file's lines)."""
    plan, errors = io.BytesIO(), io.BytesIO()
    writer = pq.ParquetWriter(plan, plan_schema())
    validated = validate(iter(lines), spec, writer, errors)
    writer.close()
    rows = pq.read_table(io.BytesIO(plan.getvalue())).to_pylist()
    return validated, rows, [json.loads(x) for x in errors.getvalue().splitlines()]


def format_errors(validated: Validated) -> list[tuple[int, str, str | None]]:
    return [(e["line"], e["code"], e["param"]) for e in validated.errors]


# ---------------------------------------------------------------- good lines


def test_good_lines_become_the_plans_rows_in_file_order(spec: JobSpec) -> None:
    png = encode(random_image(20, 16, seed=1))
    jpeg = encode(random_image(30, 20, seed=2), "JPEG")
    lines = [
        req("text-pair", {"model": NAME, "input": ["a cat", "a dog on a sofa"]}),
        b"",  # blank lines are skipped, and still counted in line numbers
        req("mixed", {"input": [{"type": "image_url", "image_url": {"url": data_uri(png)}}, {"text": "hello"}],
                      "encoding_format": "base64"}),
        req("one-text", {"input": "just one", "model": NAME}) + b"\r",  # a CRLF file
        b"   ",
        req("bare-image", {"input": b64(jpeg), "modality": "image"}),
        req("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                   {"image": data_uri(png)}]}]}),
    ]
    validated, rows, errors = run(spec, lines)

    assert errors == [] and validated.errors == []
    assert (validated.total, validated.failed, validated.inputs, validated.images, validated.model) == \
        (5, 0, 8, 3, NAME)
    texts = ["a cat", "a dog on a sofa", "hello", "just one", "hi"]
    assert validated.token_bound == sum(token_bound(t, CONTEXT) for t in texts)
    assert [(r["line"], r["custom_id"], r["index"], r["count"], r["kind"], r["param"], r["encoding_format"])
            for r in rows] == [
        (1, "text-pair", 0, 2, "text", "input[0]", "float"),
        (1, "text-pair", 1, 2, "text", "input[1]", "float"),
        (3, "mixed", 0, 2, "image", "input[0]", "base64"),
        (3, "mixed", 1, 2, "text", "input[1]", "base64"),
        (4, "one-text", 0, 1, "text", "input", "float"),
        (6, "bare-image", 0, 1, "image", "input", "float"),
        (7, "messages", 0, 2, "text", "messages[0].content[0]", "float"),
        (7, "messages", 1, 2, "image", "messages[0].content[1]", "float"),
    ]
    assert [r["value"] for r in rows] == ["a cat", "a dog on a sofa", data_uri(png), "hello", "just one", b64(jpeg),
                                          "hi", data_uri(png)]


def test_the_plan_is_written_in_row_groups_as_it_goes(spec: JobSpec) -> None:
    from serve_app.batch.job import PLAN_ROWS_PER_GROUP

    lines = [req(f"line-{i}", {"input": [f"text {i}", f"more {i}"]}) for i in range(PLAN_ROWS_PER_GROUP)]
    plan, errors = io.BytesIO(), io.BytesIO()
    writer = pq.ParquetWriter(plan, plan_schema())
    validated = validate(iter(lines), spec, writer, errors)
    writer.close()
    read = pq.ParquetFile(io.BytesIO(plan.getvalue()))
    assert validated.inputs == read.metadata.num_rows == 2 * PLAN_ROWS_PER_GROUP
    assert read.metadata.num_row_groups >= 2  # flushed every PLAN_ROWS_PER_GROUP rows, not held whole
    assert read.read().column("line").to_pylist() == [i // 2 + 1 for i in range(2 * PLAN_ROWS_PER_GROUP)]


def test_a_row_group_ends_at_its_images_bound_within_a_line(spec: JobSpec) -> None:
    """Images cut groups sooner than texts (their pixels are large between the stages), inside a line if need be:
    a line of many images never makes one huge group."""
    from serve_app.batch.job import PLAN_IMAGES_PER_GROUP

    png = data_uri(encode(random_image(8, 8)))
    lines = [req("first", {"input": "a caption"}),
             req("many", {"input": [{"image": png}] * 60}), req("more", {"input": [{"image": png}] * 60}),
             req("last", {"input": [{"image": png}] * 20 + ["and a caption"]})]
    plan, errors = io.BytesIO(), io.BytesIO()
    writer = pq.ParquetWriter(plan, plan_schema())
    seen: list[str] = []
    validated = validate(iter(lines), spec, writer, errors, on_first_input=seen.append)
    writer.close()
    read = pq.ParquetFile(io.BytesIO(plan.getvalue()))
    sizes = [read.metadata.row_group(g).num_rows for g in range(read.metadata.num_row_groups)]
    assert sizes == [1 + PLAN_IMAGES_PER_GROUP, 142 - (1 + PLAN_IMAGES_PER_GROUP)]  # cut in the last line
    assert validated.images == 140 and seen == [NAME]  # the runner warms its stages at the first work


def test_no_work_means_no_first_input(spec: JobSpec) -> None:
    seen: list[str] = []
    writer = pq.ParquetWriter(io.BytesIO(), plan_schema())
    validate(iter([req("a", {"input": []}), b"{broken"]), spec, writer, io.BytesIO(), on_first_input=seen.append)
    assert seen == []


def test_a_line_without_a_model_uses_the_first_served_one(spec: JobSpec) -> None:
    validated, rows, _ = run(spec, [req("a", {"input": "x"}), req("b", {"input": "y", "model": NAME})])
    assert validated.model == NAME and validated.errors == [] and len(rows) == 2


# ---------------------------------------------------------------- format errors: the batch fails


LONGEST_ID = "x" * MAX_CUSTOM_ID_CHARS


@pytest.mark.parametrize("lines, expected", [
    ([b"{not json"], [(1, "invalid_json_line", None)]),
    ([req("a"), b'{"custom_id": "b", "method": "POST",'], [(2, "invalid_json_line", None)]),
    ([b"[1, 2]"], [(1, "invalid_request", None)]),
    ([b'"a string"'], [(1, "invalid_request", None)]),
    ([b'{"method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}'], [(1, "invalid_custom_id", "custom_id")]),
    ([req("")], [(1, "invalid_custom_id", "custom_id")]),
    ([req(7)], [(1, "invalid_custom_id", "custom_id")]),
    ([req(LONGEST_ID + "x")], [(1, "invalid_custom_id", "custom_id")]),
    ([req("a"), req("b"), b"", req("a")], [(4, "duplicate_custom_id", "custom_id")]),
    ([req("a", method="GET")], [(1, "invalid_method", "method")]),
    ([req("a", method="post")], [(1, "invalid_method", "method")]),
    ([req("a", url="/v1/classify")], [(1, "invalid_url", "url")]),
    ([req("a", url="/embeddings")], [(1, "invalid_url", "url")]),
    ([req("a", body=["x"])], [(1, "invalid_request", "body")]),
    ([req("a", {"input": "x"}), req("b", {"input": "y", "model": "another-model"})],
     [(2, "mismatched_model", "body.model")]),
    ([req("a", {"input": "x", "model": NAME}), req("b", {"input": "y", "model": "other"}),
      req("c", {"input": "z", "model": NAME})], [(2, "mismatched_model", "body.model")]),
], ids=["not-json", "truncated", "array", "string", "no-custom-id", "empty-custom-id", "number-custom-id",
        "long-custom-id", "duplicate", "GET", "lower-case-post", "other-url", "url-without-v1", "body-list",
        "mismatched-model", "mismatched-model-named"])
def test_format_errors_fail_the_batch_with_their_line_numbers(spec: JobSpec, lines, expected) -> None:
    validated, _, errors = run(spec, lines)
    assert format_errors(validated) == expected
    assert errors == []  # format errors are the batch's, not a line's answer
    assert all(isinstance(e["message"], str) and e["message"] for e in validated.errors)


def test_every_format_error_is_reported_and_reading_goes_on(spec: JobSpec) -> None:
    lines = [req("a"), b"nope", req("b", method="GET"), req("a"), req(LONGEST_ID), req("c", url="/v1/x"), req("d")]
    validated, rows, _ = run(spec, lines)
    assert format_errors(validated) == [(2, "invalid_json_line", None), (3, "invalid_method", "method"),
                                        (4, "duplicate_custom_id", "custom_id"), (6, "invalid_url", "url")]
    assert validated.total == 7 and [r["custom_id"] for r in rows] == ["a", LONGEST_ID, "d"]


def test_reported_format_errors_are_bounded(spec: JobSpec) -> None:
    from serve_app.batch.job import MAX_REPORTED_ERRORS

    validated, _, _ = run(spec, [b"x"] * (MAX_REPORTED_ERRORS + 50))
    assert len(validated.errors) == MAX_REPORTED_ERRORS
    assert validated.errors[-1]["line"] == MAX_REPORTED_ERRORS


# ---------------------------------------------------------------- a line the online route refuses: its answer


def answer(message: str, param: str | None, status: int = 400, kind: str = "invalid_request_error") -> tuple:
    """The status and body /v1/embeddings answers (serve_app.errors.error_body: `code` is the status)."""
    return status, {"error": {"message": message, "type": kind, "param": param, "code": status}}


REFUSALS = {
    "dimensions": ({"input": "x", "dimensions": 16}, answer(
        f"`dimensions` must equal this model's embedding size {EMBED_DIM} (CLIP embeddings cannot be shortened), "
        "got 16", "dimensions")),
    "dimensions-string": ({"input": "x", "dimensions": "32"}, answer(
        "invalid value for `dimensions`: Value error, must be an integer", "dimensions")),
    "empty-input": ({"input": []}, answer("`input` must contain at least one item", "input")),
    "no-input": ({}, answer("`input` is required", "input")),
    "empty-text": ({"input": ["fine", ""]}, answer("text inputs must not be empty strings", "input[1]")),
    "long-text": ({"input": ["fine", "x" * 101]}, answer(
        "text has 101 characters; the limit is 100 (CLIP reads only a text's first 77 tokens)", "input[1]")),
    "image-url": ({"input": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]},
                  answer(URL_OFF_MESSAGE, "input[0]")),
    "token-ids": ({"input": [1, 2, 3]}, answer(
        "token-id arrays are not supported: this server embeds text and images, so send text as strings "
        "(CLIP tokenizes them itself)", "input")),
    "encoding-format": ({"input": "x", "encoding_format": "int8"}, answer(
        "invalid value for `encoding_format`: Input should be 'float' or 'base64'", "encoding_format")),
    "too-many-inputs": ({"input": ["x"] * 5}, answer(
        "`input` has 5 items; this server accepts at most 4 per request", "input")),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_body_the_online_route_refuses_is_that_lines_answer_and_the_others_run(tiny_model_dir: Path,
                                                                                 name: str) -> None:
    spec = make_spec(tiny_model_dir, max_inputs=4, limits={"max_text_chars": 100})
    body, (status, expected) = REFUSALS[name]
    validated, rows, errors = run(spec, [req("good-1"), req("bad", body), req("good-2", {"input": "x" * 100})])

    assert validated.errors == []  # the batch goes on
    assert (validated.total, validated.failed, validated.inputs) == (3, 1, 2)
    assert [r["custom_id"] for r in rows] == ["good-1", "good-2"]
    [line] = errors
    assert line["custom_id"] == "bad" and line["error"] is None
    assert line["id"].startswith("batch_req_") and line["response"]["request_id"].startswith("req_")
    assert line["response"]["status_code"] == status
    assert line["response"]["body"] == expected


def test_an_unknown_model_is_that_lines_404(spec: JobSpec) -> None:
    validated, rows, errors = run(spec, [req("a", {"input": "x", "model": "nope"})])
    assert validated.errors == [] and rows == [] and (validated.total, validated.failed) == (1, 1)
    assert errors[0]["response"]["status_code"] == 404
    assert errors[0]["response"]["body"] == answer(f"The model `nope` does not exist. Served models: {NAME}",
                                                   "model", status=404)[1]


def test_the_refusals_are_the_online_routes_mapping(spec: JobSpec) -> None:
    """The same mapping as the ingress's: error_payload for the app's errors, validation_failure for pydantic's."""
    from pydantic import ValidationError

    from serve_app.errors import InvalidRequest, error_payload, validation_failure
    from serve_app.protocol import EmbeddingRequest

    with pytest.raises(ValidationError) as refused:
        EmbeddingRequest.model_validate({"input": "x", "encoding_format": "int8"})
    # FastAPI's errors locate the body's fields under "body"; the batch validates the body itself
    online = validation_failure([{**e, "loc": ("body", *e["loc"])} for e in refused.value.errors(include_url=False)])
    _, _, errors = run(spec, [req("a", {"input": "x", "encoding_format": "int8"})])
    assert errors[0]["response"]["body"] == online.body and errors[0]["response"]["status_code"] == online.status_code

    mapped = error_payload(InvalidRequest("text inputs must not be empty strings", param="input"))
    _, _, errors = run(spec, [req("a", {"input": ""})])
    assert errors[0]["response"]["body"] == mapped.body


def test_image_urls_go_into_the_plan_where_the_policy_allows_them(tiny_model_dir: Path) -> None:
    spec = make_spec(tiny_model_dir, url_policy="public")
    url = "https://example.com/cat.png"
    validated, rows, errors = run(spec, [req("a", {"input": [{"image": url}]})])
    assert errors == [] and validated.images == 1 and rows[0]["value"] == url and rows[0]["kind"] == "image"


# ---------------------------------------------------------------- a batch's bounds


def test_a_file_with_more_requests_than_allowed_fails(tiny_model_dir: Path) -> None:
    spec = make_spec(tiny_model_dir, max_requests_per_file=2)
    validated, _, _ = run(spec, [req("a"), b"", req("b")])  # blank lines are not requests
    assert validated.errors == [] and validated.total == 2
    validated, _, _ = run(spec, [req("a"), b"", req("b"), req("c"), req("d")])
    assert format_errors(validated) == [(4, "too_many_requests", None)]
    assert "2" in validated.errors[0]["message"]


def test_a_batch_with_more_inputs_than_allowed_fails(tiny_model_dir: Path) -> None:
    spec = make_spec(tiny_model_dir, max_inputs_per_batch=3)
    validated, _, _ = run(spec, [req("a", {"input": ["x", "y"]}), req("b", {"input": "z"})])
    assert validated.errors == [] and validated.inputs == 3
    validated, _, _ = run(spec, [req("a", {"input": ["x", "y"]}), req("b", {"input": ["z", "w"]}), req("c")])
    assert format_errors(validated) == [(2, "too_many_inputs", None)]
    # lines refused by the online checks hold no inputs
    validated, _, _ = run(spec, [req("a", {"input": ["x", "y"]}), req("b", {"input": ["z", ""]}), req("c")])
    assert validated.errors == [] and (validated.inputs, validated.failed) == (3, 1)


@pytest.mark.parametrize("lines", [[], [b""], [b"", b"  ", b"\r", b"\t"]], ids=["no-lines", "one-blank", "blanks"])
def test_an_empty_file_fails(spec: JobSpec, lines: list[bytes]) -> None:
    validated, rows, _ = run(spec, lines)
    assert format_errors(validated) == [(1, "empty_file", None)] and rows == []


def test_a_file_whose_every_line_is_refused_is_not_empty(spec: JobSpec) -> None:
    validated, rows, errors = run(spec, [req("a", {"input": []}), req("b", {"input": ""})])
    assert validated.errors == [] and rows == [] and (validated.total, validated.failed) == (2, 2)
    assert len(errors) == 2


def test_a_line_longer_than_the_limit_fails_the_batch_with_its_number(spec: JobSpec, tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store"))
    long_line = req("b", {"input": "y" * 400})
    store.write("files/in", io.BytesIO(b"\n".join([req("a"), long_line, req("c")]) + b"\n"))
    plan, errors = io.BytesIO(), io.BytesIO()  # the store's generator raises as validate() reads it
    writer = pq.ParquetWriter(plan, plan_schema())
    validated = validate(store.lines("files/in", len(long_line) - 1), spec, writer, errors)
    writer.close()
    assert format_errors(validated) == [(2, "line_too_long", None)]
    assert validated.errors[0]["message"] == f"line 2 is longer than {len(long_line) - 1} bytes"
    validated = validate(store.lines("files/in", len(long_line)), spec, pq.ParquetWriter(io.BytesIO(), plan_schema()),
                         io.BytesIO())
    assert validated.errors == [] and validated.total == 3


# ---------------------------------------------------------------- cost


def test_cost_bound_is_the_batch_price_of_every_text_at_its_bound_and_every_image(spec: JobSpec) -> None:
    png = data_uri(encode(random_image(8, 8)))

    def bound(*bodies: dict[str, Any]) -> int:
        validated, _, _ = run(spec, [req(f"l{i}", body) for i, body in enumerate(bodies)])
        assert validated.errors == [] and validated.failed == 0
        return cost_bound(spec, validated)

    # default price: $0.02 per million tokens (20 nano-USD a token), $0.10 per thousand images; batches at half
    assert bound({"input": "a"}) == (2 + 1) * 20 // 2
    assert bound({"input": "a b c"}) == (2 + 3) * 20 // 2  # spaces are no tokens' bytes
    assert bound({"input": "x" * 500}) == CONTEXT * 20 // 2  # a text is cut at the model's context
    assert bound({"input": [{"image": png}]}) == 100_000 // 2
    assert bound({"input": [{"image": png}, "a"]}, {"input": [{"image": png}]}) == (2 * 100_000 + 3 * 20) // 2
    # more texts, longer texts, more images: a larger bound
    assert bound({"input": "a"}) < bound({"input": "a longer text"}) < bound({"input": ["a longer text", "more"]}) \
        < bound({"input": ["a longer text", "more", {"image": png}]})


def test_cost_bound_and_cost_use_the_models_price_and_the_batch_factor(tiny_model_dir: Path) -> None:
    tenancy = TenancySettings(price=Price(usd_per_million_tokens=1, usd_per_thousand_images=1),
                              prices={NAME: Price(usd_per_million_tokens=10, usd_per_thousand_images=2)})
    spec = make_spec(tiny_model_dir, tenancy=tenancy, price_factor=0.25)
    validated, _, _ = run(spec, [req("a", {"input": ["abcd", {"image": data_uri(encode(random_image(8, 8)))}]})])
    assert cost_bound(spec, validated) == int((6 * 10 * 1000 + 2 * 1_000_000) * 0.25)
    assert cost(spec, NAME, 6, 1) == cost_bound(spec, validated)
    assert cost(spec, "unpriced", 6, 1) == int((6 * 1000 + 1_000_000) * 0.25)
    assert cost(spec, None, 0, 0) == 0


# ---------------------------------------------------------------- the store, on a local directory


def expected_lines(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    return parts[:-1] if parts[-1] == b"" else parts


def assorted_lines(total: int) -> bytes:
    """Lines of many lengths (empty ones too) past `total` bytes, newlines landing on every side of CHUNK."""
    out, i = [], 0
    size = 0
    while size < total:
        line = (b"%d:" % i) + bytes([97 + i % 26]) * ((i * 7919) % 3001)
        out.append(line)
        size += len(line) + 1
        i += 1
    return b"\n".join(out) + b"\n"


def test_a_local_store_round_trips_objects(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "store" / "nested"))
    assert Path(store.root).is_dir()
    data = assorted_lines(3 * CHUNK)
    assert store.write("files/file-1", io.BytesIO(data)) == len(data)
    assert store.size("files/file-1") == len(data)
    assert b"".join(store.chunks("files/file-1")) == data
    assert all(len(c) <= CHUNK for c in store.chunks("files/file-1"))
    assert list(store.lines("files/file-1", 4000)) == expected_lines(data)
    with store.open_output("batches/b/output.jsonl") as out:  # a stream, as the runner writes outputs
        out.write(b'{"a": 1}\n')
    with store.open_input("batches/b/output.jsonl") as stream:
        assert stream.read() == b'{"a": 1}\n'
    assert (tmp_path / "store" / "nested" / "batches" / "b" / "output.jsonl").is_file()
    store.delete("files/file-1")
    assert store.size("files/file-1") == 0 and not (Path(store.root) / "files" / "file-1").exists()
    store.delete("files/file-1")  # deleting what is gone is fine
    store.delete("files/never-written")


def test_the_store_comes_from_the_environment_when_not_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CLIP_BATCH_STORAGE", str(tmp_path / "from-env"))
    assert FileStore(None).root == str((tmp_path / "from-env").resolve())


@pytest.mark.parametrize("data", [
    pytest.param(b"a" * (CHUNK - 1) + b"\n" + b"b" * 10 + b"\n", id="break-at-chunk-end"),
    pytest.param(b"a" * CHUNK + b"\n" + b"b" * 10 + b"\n", id="break-opens-the-next-chunk"),
    pytest.param(b"a" * 10 + b"\n" + b"b" * (2 * CHUNK + 5) + b"\n" + b"c", id="line-across-three-chunks"),
    pytest.param(b"x\n" * (CHUNK // 2 + 3) + b"last-without-break", id="many-short-lines"),
    pytest.param(b"\n\n" + b"y" * (CHUNK + 1) + b"\r\n\n", id="empty-lines-and-crlf"),
    pytest.param(b"", id="empty"),
])
def test_lines_are_split_alike_wherever_the_chunks_end(tmp_path: Path, data: bytes) -> None:
    store = FileStore(str(tmp_path))
    store.write("f", io.BytesIO(data))
    assert list(store.lines("f", 3 * CHUNK)) == expected_lines(data)


def test_lines_of_a_file_larger_than_a_chunk(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    data = assorted_lines(CHUNK + CHUNK // 2)
    store.write("f", io.BytesIO(data))
    assert list(store.lines("f", 3001 + 10)) == expected_lines(data)


@pytest.mark.parametrize("before, at", [
    (b"short\n" * 3, 4),  # the long line within one chunk
    (b"s\n" * ((CHUNK - 100) // 2), (CHUNK - 100) // 2 + 1),  # begins near a chunk's end, runs into the next
    (b"s\n" * (CHUNK // 2), CHUNK // 2 + 1),  # the long line begins exactly at a chunk boundary
])
@pytest.mark.parametrize("limit", [1000, CHUNK + 10])
def test_a_line_past_the_limit_is_named(tmp_path: Path, before: bytes, at: int, limit: int) -> None:
    store = FileStore(str(tmp_path))
    for tail, name in ((b"\nafter\n", "with-break"), (b"", "last-line")):
        store.write(name, io.BytesIO(before + b"L" * (limit + 1) + tail))
        with pytest.raises(LineTooLong) as raised:
            list(store.lines(name, limit))
        assert raised.value.line == at, name
        assert str(raised.value) == f"line {at} is longer than {limit} bytes"
        # exactly at the limit passes
        store.write(name, io.BytesIO(before + b"L" * limit + tail))
        assert list(store.lines(name, limit)) == expected_lines(before + b"L" * limit + tail)


# ---------------------------------------------------------------- the store, on S3 (moto's server)


def test_an_s3_store_writes_reads_and_deletes_objects(s3_server) -> None:
    bucket = s3_server.create_bucket()
    store = FileStore(s3_server.store_uri(bucket, "clip/files-root"))
    assert store.filesystem.type_name == "s3" and store.root == f"{bucket}/clip/files-root"
    data = assorted_lines(12 * CHUNK)  # past pyarrow's upload part size: a multipart upload
    assert store.write("files/file-1", io.BytesIO(data)) == len(data)
    assert store.size("files/file-1") == len(data)
    assert b"".join(store.chunks("files/file-1")) == data
    assert list(store.lines("files/file-1", 4000)) == expected_lines(data)
    with pytest.raises(LineTooLong) as raised:
        list(store.lines("files/file-1", 2000))
    assert raised.value.line == expected_lines(data).index(next(x for x in expected_lines(data) if len(x) > 2000)) + 1

    with store.open_output("batches/b/errors.jsonl") as out:
        out.write(b'{"x": 1}\n')
    keys = {o["Key"]: o["Size"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys["clip/files-root/files/file-1"] == len(data)
    assert keys["clip/files-root/batches/b/errors.jsonl"] == 9

    store.delete("files/file-1")
    assert store.size("files/file-1") == 0
    with pytest.raises(FileNotFoundError):
        store.open_input("files/file-1").read()
    store.delete("files/file-1")  # a missing object is fine
    store.delete("files/never-written")
    store.delete("batches/b/errors.jsonl")
    left = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in left if not o["Key"].endswith("/")] == []  # (pyarrow may leave directory markers)


def test_an_s3_store_takes_its_options_from_the_uri(s3_server) -> None:
    bucket = s3_server.create_bucket()
    uri = f"s3://{bucket}/p?endpoint_override={s3_server.endpoint}&scheme=http"  # the README's form, no region
    store = FileStore(uri)
    store.write("a", io.BytesIO(b"one\ntwo"))
    assert list(FileStore(uri).lines("a", 10)) == [b"one", b"two"]


# ---------------------------------------------------------------- the runner's side of validation (no Ray Data)


def run_batch(tmp_path: Path, spec: JobSpec, lines: list[bytes], during_validation=None, monkeypatch=None,
              expires_in: int = 3600, attempts: int = 0, status: str = "validating"):
    """One batch through BatchWork.run up to the point where Ray Data would start: its input file in a local
    store, its records in SQLite; `execute` is replaced by a stub that records its call (and the warm stages by a
    stand-in). `during_validation(work,
    row)` runs in the job's thread right after validate(). Returns (the batch's row at the end, the store's
    names under batches/, whether execute ran)."""
    import serve_app.batch.runner as runner
    from serve_app.batch.records import BatchRecords, now_s

    store = FileStore(str(tmp_path / "store"))
    executed: list[str] = []

    class FakeStages:  # no Ray here: the warm stages as the runner sees them
        alive = True

        def __init__(self, spec, model_name, reads=0, thread_init=None):
            self.model_name = model_name

        def reads_left(self) -> int:
            return 1 << 30

        def close(self) -> None:
            self.alive = False

    def fake_execute(stages, plan_path, filesystem, output, errors_out, should_stop, outcome: Outcome, stall_s):
        executed.append(stages.model_name)
        return outcome

    real_validate = runner.validate

    def validate_then(lines, spec, plan, errors_out, on_first_input=None):
        result = real_validate(lines, spec, plan, errors_out, on_first_input)
        if during_validation is not None:
            during_validation(work, row)
        return result

    monkeypatch.setattr(runner, "execute", fake_execute)
    monkeypatch.setattr(runner, "StagePipeline", FakeStages)
    monkeypatch.setattr(runner, "validate", validate_then)

    async def main() -> dict[str, Any]:
        nonlocal work, row
        records = BatchRecords(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
        try:
            store.write("files/file-in", io.BytesIO(b"\n".join(lines) + b"\n"))
            now = now_s()
            await records.add_file({"id": "file-in", "owner": "key_a", "purpose": "batch", "filename": "in.jsonl",
                                    "bytes": 1, "lines": len(lines), "created_at": now, "expires_at": now + 3600,
                                    "object_name": "files/file-in"})
            await records.add_batch({
                "id": "batch_1", "owner": "key_a", "endpoint": "/v1/embeddings", "input_file_id": "file-in",
                "completion_window": "24h", "status": status, "metadata": None, "created_at": now,
                "expires_at": now + expires_in, "total": 0, "completed": 0, "failed": 0, "input_tokens": 0,
                "images": 0, "held_nano_usd": 0, "lease_until_us": 0, "attempts": attempts}, max_active=8)
            work = runner.BatchWork(BatchAPISettings(lease_s=30, poll_interval_s=0.05), spec, records, store, None)
            row = await records.claim(work.id, 30)
            await asyncio.wait_for(work.run(row), 60)
            return await records.batch(None, "batch_1")
        finally:
            await records.close()

    work = row = None
    final = asyncio.run(main())
    names = sorted(str(p.relative_to(Path(store.root))) for p in Path(store.root, "batches").rglob("*")
                   if p.is_file()) if Path(store.root, "batches").exists() else []
    return final, names, executed


def test_a_batch_with_format_errors_fails_with_them(tmp_path: Path, spec: JobSpec, monkeypatch) -> None:
    final, _, executed = run_batch(tmp_path, spec, [req("a"), b"{broken", req("a")], monkeypatch=monkeypatch)
    assert final["status"] == "failed" and final["failed_at"] and not executed
    assert [(e["line"], e["code"]) for e in json.loads(final["errors"])] == [(2, "invalid_json_line"),
                                                                             (3, "duplicate_custom_id")]
    assert final["held_nano_usd"] == 0 and final["error_file_id"] is None


def test_a_batch_that_fails_validation_leaves_no_objects_behind(tmp_path: Path, spec: JobSpec, monkeypatch) -> None:
    _, names, _ = run_batch(tmp_path, spec, [req("a", {"input": []}), b"{broken"], monkeypatch=monkeypatch)
    assert names == []


def test_a_batch_whose_lines_all_fail_validation_completes_with_an_error_file(tmp_path: Path, spec: JobSpec,
                                                                              monkeypatch) -> None:
    final, names, executed = run_batch(tmp_path, spec, [req("a", {"input": []}), req("b", {"input": ""})],
                                       monkeypatch=monkeypatch)
    assert not executed  # nothing left to embed
    assert (final["status"], final["total"], final["completed"], final["failed"]) == ("completed", 2, 0, 2)
    assert final["error_file_id"] and final["output_file_id"] is None
    assert names == ["batches/batch_1/errors.jsonl"]


def test_a_cancel_during_validation_ends_the_batch_cancelled_without_running_it(tmp_path: Path, spec: JobSpec,
                                                                               monkeypatch) -> None:
    def cancel(work, row) -> None:
        assert work._call(work.records.request_cancel("key_a", row["id"]))["status"] == "cancelling"

    final, _, executed = run_batch(tmp_path, spec, [req("a"), req("b")], during_validation=cancel,
                                   monkeypatch=monkeypatch)
    assert final["status"] == "cancelled" and final["cancelled_at"]
    assert executed == []


# ---------------------------------------------------------------- what a hostile key holder tried


def test_an_empty_model_name_is_the_online_404_and_the_batch_ends(tmp_path: Path, spec: JobSpec, monkeypatch) -> None:
    """`"model": ""` is not the default model (the online route answers 404): the line fails alone, nothing
    reaches the encoders, and the batch ends (it once hung its runner for good)."""
    validated, rows, errors = run(spec, [req("a", {"model": "", "input": "x"})])
    assert rows == [] and validated.failed == 1
    assert errors[0]["response"]["status_code"] == 404
    assert errors[0]["response"]["body"]["error"]["param"] == "model"
    final, _, executed = run_batch(tmp_path, spec, [req("a", {"model": "", "input": "x"})], monkeypatch=monkeypatch)
    assert (final["status"], final["failed"], executed) == ("completed", 1, [])


def test_a_custom_id_that_is_not_valid_unicode_is_a_format_error(spec: JobSpec) -> None:
    validated, rows, _ = run(spec, [b'{"custom_id": "a\\ud800", "method": "POST", "url": "/v1/embeddings", '
                                    b'"body": {"input": "x"}}'])
    assert [(e["line"], e["code"]) for e in validated.errors] == [(1, "invalid_custom_id")] and rows == []


def test_a_line_of_more_json_values_than_an_online_body_may_hold_is_refused_before_parsing(spec: JobSpec) -> None:
    limit = spec.limits.max_json_values
    padded = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x", "pad": [' + \
        b",".join([b"{}"] * limit) + b"]}}"
    validated, rows, _ = run(spec, [req("fine"), padded])
    assert [(e["line"], e["code"]) for e in validated.errors] == [(2, "too_many_json_values")]


def test_a_huge_integer_is_refused_as_online(spec: JobSpec) -> None:
    line = b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x", "dimensions": ' + \
        b"9" * 5000 + b"}}"
    validated, rows, errors = run(spec, [line])
    assert rows == [] and ((validated.errors and validated.errors[0]["code"] == "invalid_json_line")
                           or errors[0]["response"]["status_code"] == 400)


def test_a_batch_claimed_past_its_window_expires_without_running(tmp_path: Path, spec: JobSpec, monkeypatch) -> None:
    final, names, executed = run_batch(tmp_path, spec, [req("a")], monkeypatch=monkeypatch, expires_in=-1)
    assert (final["status"], executed, names) == ("expired", [], []) and final["expired_at"]


def test_a_batch_whose_runs_all_died_fails_instead_of_running_again(tmp_path: Path, spec: JobSpec,
                                                                  monkeypatch) -> None:
    """Each claim counts an attempt; a batch claimed again after `max_attempts` runs (each runner died) fails."""
    final, _, executed = run_batch(tmp_path, spec, [req("a")], monkeypatch=monkeypatch,
                                   attempts=BatchAPISettings().max_attempts)
    assert final["status"] == "failed" and executed == []
    assert json.loads(final["errors"])[0]["code"] == "job_failed"


def test_lower_priority_is_relative_per_thread_and_can_be_idle() -> None:
    """Ray starts workers at its own niceness (15): the stages' niceness adds to it (capped at 19), and SCHED_IDLE
    puts them behind every other process. Only the calling thread changes (the runner's other threads do not)."""
    import os
    import threading

    from serve_app.batch.dataset import lower_priority

    before = os.nice(0)
    seen = {}

    def lowered() -> None:
        lower_priority(3, idle=True)
        seen["nice"], seen["policy"] = os.nice(0), os.sched_getscheduler(0)

    thread = threading.Thread(target=lowered)
    thread.start()
    thread.join()
    assert seen == {"nice": min(before + 3, 19), "policy": os.SCHED_IDLE}
    assert os.nice(0) == before and os.sched_getscheduler(0) == os.SCHED_OTHER


def test_the_jobs_encoder_threads_are_its_cpus_not_the_services() -> None:
    from serve_app.batch.dataset import EmbedSettings, encoder_spec
    from serve_app.config import ModelSpec

    spec = ModelSpec(model="ViT-B-32", torch_threads=8)
    assert encoder_spec(spec, EmbedSettings(encoder_cpus=2)).torch_threads == 2
    assert encoder_spec(spec, EmbedSettings(num_gpus=1)).torch_threads == 8


@pytest.mark.parametrize("left", ["in_progress", "finalizing"])
def test_a_batch_whose_runner_died_midway_is_run_again_whatever_step_it_was_at(tmp_path: Path, spec: JobSpec,
                                                                               monkeypatch, left: str) -> None:
    """A runner killed after writing `finalizing` (its answers not yet recorded) left a batch that the next runner
    must run, not end with nothing done."""
    final, _, executed = run_batch(tmp_path, spec, [req("a")], monkeypatch=monkeypatch, attempts=1, status=left)
    assert executed == [NAME] and final["status"] == "completed"
