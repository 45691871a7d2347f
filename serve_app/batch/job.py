"""One batch's work: validate its input file, run its lines on Ray Data, write the output and error files.

1. `validate` streams the input file once (never whole in memory): each line is parsed and checked with the online
   route's own code (`EmbeddingRequest`, `collect_inputs`, `check_request_budget`). Format errors (invalid JSON, a
   missing field, a repeated `custom_id`, another endpoint or model) fail the batch, with their line numbers, as
   OpenAI's validation does. A line whose body the online route would refuse is answered then and there, in the
   error file, with the online route's error. Every other line becomes rows of a plan (one row per input) in
   Parquet, beside the outputs in the store.
2. `execute` feeds the plan, a row group at a time, to the runner's warm Ray Data stages (serve_app/batch/pipeline.py):
   `LinePreprocess` (CPU actors: the online preprocessing's `ModelPreprocessing` and URL fetcher) and `LineEncode`
   (actors of the online encoder's `EncoderCore`), in the plan's order, and reassembles each line's inputs into the
   body `/v1/embeddings` answers (`embedding_response`). An input that fails (an image that does not decode) fails
   its line with the online route's error.

The caller (serve_app/batch/runner.py) owns the batch's record: it reads the counts from `Outcome` as they move,
and `execute`'s `should_stop` tells this module that it must stop (cancelled, expired, lease lost).
"""

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from serve_app.config import ImageLimits, ImageURLPolicy, JobStages, ModelSpec, Price, RequestLimits
from serve_app.errors import ServeAppError, error_payload, validation_failure

if TYPE_CHECKING:
    import pyarrow as pa

    from serve_app.batch.pipeline import StagePipeline

logger = logging.getLogger(__name__)

MAX_CUSTOM_ID_CHARS = 512
MAX_REPORTED_ERRORS = 100
# A plan's row group (the unit of work of the stages: one call of each, whose answers reach the runner, count and
# can stop a group at a time) ends, within a line if need be, once it holds PLAN_IMAGES_PER_GROUP images (their
# pixels are 19 MB at 224x224; a larger encoder batch, `job.batch_size`, makes that many) or PLAN_ROWS_PER_GROUP
# inputs (texts cost little each: larger groups spread the stages' per-call cost over more of them).
PLAN_IMAGES_PER_GROUP = 128
PLAN_ROWS_PER_GROUP = 1024
# Columns of the plan: one row per input, lines in file order, a line's inputs in order.
PLAN_SCHEMA_FIELDS = (
    ("line", "int64"), ("custom_id", "string"), ("index", "int32"), ("count", "int32"),
    ("encoding_format", "string"), ("kind", "string"), ("value", "large_string"), ("param", "string"),
)
_WORK = "__work"
_TOKENS_USED = "__tokens_used"
_FAILURE = "__failure"  # JSON [status, error body] of a failed input


@dataclass
class JobSpec:
    """What a runner needs of the service's configuration to run a batch exactly as the online route answers."""

    endpoint: str
    models: list[ModelSpec]
    image_limits: ImageLimits
    limits: RequestLimits
    url_policy: ImageURLPolicy
    max_inputs_per_request: int
    max_requests_per_file: int
    max_inputs_per_batch: int
    max_line_bytes: int
    stages: JobStages
    price: Price
    prices: dict[str, Price] = field(default_factory=dict)
    price_factor: float = 0.5
    list_limits: tuple[int, int, int] = (2048, 4096, 128)


@dataclass
class Validated:
    total: int = 0  # request lines
    failed: int = 0  # lines answered with an error at validation
    inputs: int = 0
    images: int = 0
    token_bound: int = 0
    model: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)  # format errors: the batch fails


@dataclass
class Outcome:
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    images: int = 0
    stopped: str | None = None  # why the run stopped early: "cancelling", "expired", "lost"


def _error_line(custom_id: Any, status: int, body: dict[str, Any]) -> bytes:
    line = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": "req_" + uuid.uuid4().hex, "body": body},
            "error": None}
    return (json.dumps(line, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


def _ok_line(custom_id: str, body_json: str) -> bytes:
    return ('{"id":"batch_req_%s","custom_id":%s,"response":{"status_code":200,"request_id":"req_%s","body":%s},'
            '"error":null}\n' % (uuid.uuid4().hex, json.dumps(custom_id, ensure_ascii=True), uuid.uuid4().hex,
                                 body_json)).encode()


class _Served:
    """What the online code asks of a served model here: its name and its config (`check_dimensions`)."""

    def __init__(self, spec: ModelSpec) -> None:
        from serve_app.modeling import load_model_config

        self.name = spec.name
        self.spec = spec
        self.config = load_model_config(spec.model, spec.pretrained)


# ---------------------------------------------------------------- 1. validation


def validate(lines: Iterator[bytes], spec: JobSpec, plan: Any, errors_out: Any,
             on_first_input: Callable[[str], None] | None = None) -> Validated:
    """Reads every line once; writes the plan's rows (`plan`: a pyarrow ParquetWriter) and the lines refused with
    the online route's error (`errors_out`, a binary stream). Format errors are collected, not raised.
    `on_first_input(model)` is called at the first line that becomes work (the runner warms its stages then)."""
    import pyarrow as pa

    from serve_app.errors import ModelNotFound
    from serve_app.inputs import ImageInput, TextInput, check_request_budget, collect_inputs
    from serve_app.protocol import EmbeddingRequest, configure_list_limits
    from serve_app.serving import check_dimensions
    from serve_app.tenancy.gate import token_bound

    import sys

    configure_list_limits(*spec.list_limits)
    sys.set_int_max_str_digits(640)  # as the ingress (configure_guard): a huge integer costs quadratic time
    served = {s.name: s for s in spec.models}
    default = spec.models[0].name
    configs: dict[str, _Served] = {}
    result = Validated()
    seen: set[str] = set()
    rows: dict[str, list[Any]] = {name: [] for name, _ in PLAN_SCHEMA_FIELDS}
    schema = plan_schema()
    group_images = max(PLAN_IMAGES_PER_GROUP, spec.stages.batch_size)
    group_rows = max(PLAN_ROWS_PER_GROUP, spec.stages.batch_size)
    images_in_group = 0

    def flush() -> None:
        if rows["line"]:
            plan.write_table(pa.table({n: rows[n] for n, _ in PLAN_SCHEMA_FIELDS}, schema=schema))
            for column in rows.values():
                column.clear()

    def error(line: int, code: str, message: str, param: str | None = None) -> None:
        if len(result.errors) < MAX_REPORTED_ERRORS:
            result.errors.append({"code": code, "message": message, "param": param, "line": line})

    from serve_app.batch.store import LineTooLong

    try:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            result.total += 1
            if result.total > spec.max_requests_per_file:
                error(number, "too_many_requests", f"the file has more than {spec.max_requests_per_file} requests; "
                      "split it into several batches")
                break
            # The online body's bound on JSON values (ingress._body_cap), before parsing: parsing costs per value.
            if raw.count(b",") + raw.count(b"{") + raw.count(b"[") > spec.limits.max_json_values:
                error(number, "too_many_json_values", f"this line holds more than {spec.limits.max_json_values} "
                      "JSON values (commas, braces and brackets counted); send fewer items per request")
                continue
            try:
                request = json.loads(raw)
            except (ValueError, RecursionError):
                error(number, "invalid_json_line", "this line is not valid JSON")
                continue
            if not isinstance(request, dict):
                error(number, "invalid_request", "each line must be a JSON object")
                continue
            custom_id = request.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS \
                    or not _valid_utf8(custom_id):
                error(number, "invalid_custom_id",
                      f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters of valid "
                      "Unicode",
                      "custom_id")
                continue
            if custom_id in seen:
                error(number, "duplicate_custom_id", f"custom_id {custom_id[:64]!r} appears more than once in the file",
                      "custom_id")
                continue
            seen.add(custom_id)
            if request.get("method") != "POST":
                error(number, "invalid_method", "method must be POST", "method")
                continue
            if request.get("url") != spec.endpoint:
                error(number, "invalid_url", f"url must be the batch's endpoint, {spec.endpoint}", "url")
                continue
            body = request.get("body")
            if not isinstance(body, dict):
                error(number, "invalid_request", "body must be a JSON object", "body")
                continue
            # the online route's choice of model: the one named (a string), else the first served one
            model_name = body.get("model") if isinstance(body.get("model"), str) else default
            if result.model is None:
                result.model = model_name
            elif model_name != result.model:
                error(number, "mismatched_model", "every request of a batch must use the same model", "body.model")
                continue
            # The online route's own checks, in its order; a refusal is this line's answer.
            try:
                parsed = EmbeddingRequest.model_validate(body)
                name = parsed.model if parsed.model is not None else default
                if name not in served:
                    raise ModelNotFound(f"The model `{name}` does not exist. Served models: {', '.join(served)}",
                                        param="model")
                model = configs.get(name) or configs.setdefault(name, _Served(served[name]))
                check_dimensions(model, parsed.dimensions)
                inputs = collect_inputs(parsed, spec.max_inputs_per_request, spec.url_policy)
                check_request_budget(inputs, spec.limits)
            except ValidationError as exc:
                mapped = validation_failure(exc.errors(include_url=False))
                errors_out.write(_error_line(custom_id, mapped.status_code, mapped.body))
                result.failed += 1
                continue
            except ServeAppError as exc:
                mapped = error_payload(exc)
                errors_out.write(_error_line(custom_id, mapped.status_code, mapped.body))
                result.failed += 1
                continue
            if not result.inputs and on_first_input is not None:
                on_first_input(name)
            result.inputs += len(inputs)
            if result.inputs > spec.max_inputs_per_batch:
                error(number, "too_many_inputs", f"the batch has more than {spec.max_inputs_per_batch} embedding "
                      "inputs; split it into several batches")
                break
            context = model.config.context_length
            for index, item in enumerate(inputs):
                is_text = isinstance(item, TextInput)
                rows["line"].append(number)
                rows["custom_id"].append(custom_id)
                rows["index"].append(index)
                rows["count"].append(len(inputs))
                rows["encoding_format"].append(parsed.encoding_format)
                rows["kind"].append("text" if is_text else "image")
                rows["value"].append(item.text if is_text else item.data)
                rows["param"].append(item.param)
                if is_text:
                    result.token_bound += token_bound(item.text, context)
                elif isinstance(item, ImageInput):
                    result.images += 1
                    images_in_group += 1
                if len(rows["line"]) >= group_rows or images_in_group >= group_images:  # a line may go on in
                    images_in_group = 0                                                   # the next group
                    flush()
    except LineTooLong as exc:
        error(exc.line, "line_too_long", str(exc))
    flush()
    if result.total == 0 and not result.errors:
        error(1, "empty_file", "the input file has no requests")
    return result


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON can carry it, no output line or Parquet string can
        return False
    return True


def plan_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in PLAN_SCHEMA_FIELDS])


def cost_bound(spec: JobSpec, validated: Validated) -> int:
    """What the batch may cost at most, nano-USD: every text at its token bound, every image."""
    from serve_app.tenancy.gate import price_of

    price = spec.prices.get(validated.model or "", spec.price)
    return int(price_of(price, validated.token_bound, validated.images) * spec.price_factor)


def cost(spec: JobSpec, model: str | None, tokens: int, images: int) -> int:
    from serve_app.tenancy.gate import price_of

    return int(price_of(spec.prices.get(model or "", spec.price), tokens, images) * spec.price_factor)


# ---------------------------------------------------------------- 2. the Ray Data stages


class LinePreprocess:
    """CPU stage: each input row's image fetched (under the URL policy), decoded and transformed, or its text
    tokenized, by the online preprocessing's `ModelPreprocessing`; work as bytes (uint8 pixels or int64 tokens).
    A failed input carries the online route's error instead."""

    def __init__(self, spec: ModelSpec, image_limits: ImageLimits, limits: RequestLimits,
                 url_policy: ImageURLPolicy, niceness: int = 0, idle: bool = False) -> None:
        from serve_app.batch.dataset import lower_priority

        lower_priority(niceness, idle)  # before any import: loading is work too
        import torch
        from PIL import Image

        from serve_app.fetch import ImageFetcher
        from serve_app.preprocess import ModelPreprocessing

        torch.set_num_threads(1)
        Image.MAX_IMAGE_PIXELS = image_limits.max_image_pixels
        self.preprocessing = ModelPreprocessing(spec, image_limits)
        self.limits = limits
        self.image_limits = image_limits
        self.fetcher = ImageFetcher(url_policy, limits, image_limits.max_image_bytes) if url_policy != "off" else None

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import asyncio

        import numpy as np
        import pyarrow as pa

        from serve_app.batch.dataset import fetch_images
        from serve_app.errors import InvalidRequest
        from serve_app.inputs import is_url

        kinds = batch.column("kind").to_pylist()
        values = batch.column("value").to_pylist()
        params = batch.column("param").to_pylist()
        work: list[bytes | None] = [None] * len(kinds)
        used = [0] * len(kinds)
        failures: list[str | None] = [None] * len(kinds)
        texts = [i for i, k in enumerate(kinds) if k == "text"]
        if texts:
            tokens = self.preprocessing.texts([values[i] for i in texts])
            for row, i in enumerate(texts):
                work[i] = tokens.tokens[row].numpy().astype(np.int64).tobytes()
                used[i] = tokens.token_counts[row]
        urls = [i for i, k in enumerate(kinds) if k == "image" and is_url(values[i])]
        fetched = asyncio.run(fetch_images(
            self.fetcher, [values[i] for i in urls], [params[i] for i in urls], self.limits.url_fetches_per_request,
            self.image_limits.max_image_bytes)) if urls else []
        items: dict[int, Any] = dict(zip(urls, fetched))
        for i, kind in enumerate(kinds):
            if kind == "end":  # the pipeline's end row (serve_app/batch/pipeline.py): no work, no vector
                failures[i] = json.dumps([0, None])
            if kind != "image":
                continue
            try:
                item = items.get(i, values[i])
                if isinstance(item, BaseException):
                    raise item
                if not item:  # a fetched image with no body (an inline one is never empty: validation)
                    raise InvalidRequest("image URL returned an empty body", param=params[i])
                work[i] = np.ascontiguousarray(self.preprocessing.pixels(item, params[i])).tobytes()
            except Exception as exc:  # this input's line fails with the online route's answer
                mapped = error_payload(exc)
                failures[i] = json.dumps([mapped.status_code, mapped.body], ensure_ascii=True)
        return (batch.drop_columns(["value"])
                .append_column(_WORK, pa.array(work, type=pa.large_binary()))
                .append_column(_TOKENS_USED, pa.array(used, type=pa.int32()))
                .append_column(_FAILURE, pa.array(failures, type=pa.string())))

class LineEncode:
    """Encoder stage: one `EncoderCore` (the online encoder's model and forward passes) per actor; the rows that
    did not fail get their unit vector."""

    def __init__(self, spec: ModelSpec, batch_size: int, niceness: int = 0, idle: bool = False) -> None:
        from serve_app.batch.dataset import lower_priority

        lower_priority(niceness, idle)
        from serve_app.encoder import EncoderCore

        self.core = EncoderCore(spec)
        self.batch_size = batch_size

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import numpy as np
        import torch

        from serve_app.batch.dataset import embedding_column

        kinds = np.asarray(batch.column("kind").to_pylist())
        ok = np.asarray(batch.column(_FAILURE).is_null(), dtype=bool)
        work = batch.column(_WORK).to_pylist()
        vectors: np.ndarray | None = None
        for kind in ("image", "text"):
            rows = np.flatnonzero(ok & (kinds == kind))
            if not len(rows):
                continue
            shape = (3, *self.core.image_size)
            for start in range(0, len(rows), self.batch_size):  # forward passes of at most batch_size rows
                chunk = rows[start:start + self.batch_size]
                if kind == "image":
                    data = torch.from_numpy(np.stack([np.frombuffer(work[i], dtype=np.uint8).reshape(shape)
                                                      for i in chunk]))
                    self.core.check_pixels(data)
                    out = self.core.encode_images(data)
                else:
                    data = torch.from_numpy(np.stack([np.frombuffer(work[i], dtype=np.int64) for i in chunk]))
                    self.core.check_tokens(data)
                    out = self.core.encode_texts(data)
                if vectors is None:
                    vectors = np.zeros((len(kinds), out.shape[1]), dtype=np.float32)
                vectors[chunk] = out
        kept = vectors[ok] if vectors is not None else np.zeros((0, 0), dtype=np.float32)
        return batch.drop_columns([_WORK]).append_column("embedding", embedding_column(ok, kept))


# ---------------------------------------------------------------- 3. running the plan


def execute(stages: "StagePipeline", plan_path: str, filesystem: Any, output: Any, errors_out: Any,
            should_stop: Callable[[], str | None], outcome: Outcome, stall_s: float = 900.0) -> Outcome:
    """Feeds the plan's row groups to the warm stages (serve_app/batch/pipeline.py), a few ahead of what came back,
    and writes each line's answer as its rows come back, in the plan's order; `outcome` counts as it goes (what was
    done before a stop is kept and billed). Raises when no group came back for `stall_s` (stages that are stuck:
    an actor killed again and again, a read that never ends): the runner then lets the stages go."""
    import pyarrow.parquet as pq

    with filesystem.open_input_file(plan_path) as f:
        metadata = pq.ParquetFile(f).metadata
    groups, expected = metadata.num_row_groups, metadata.num_rows
    tag = stages.new_run()
    served = _Named(stages.model_name)
    fed = returned = received = 0
    progress = time.monotonic()
    pending: list[dict[str, Any]] = []  # the rows so far of a line that the next group finishes
    while received < expected:
        stop = should_stop()
        if stop:
            outcome.stopped = stop
            break
        while fed < groups and fed - returned < GROUPS_AHEAD:
            stages.put(tag, plan_path, filesystem, fed)
            fed += 1
        batch = stages.take(tag, TAKE_TIMEOUT_S)
        if batch is None:
            if time.monotonic() - progress > stall_s:
                raise RuntimeError(f"no row group came back from the stages for {stall_s:.0f} s")
            continue
        progress = time.monotonic()
        returned += 1
        received += batch.num_rows
        pending = _write_lines(batch, pending, served, output, errors_out, outcome)
    return outcome


# How long `execute` waits for the stages between looks at `should_stop`.
TAKE_TIMEOUT_S = 0.5
# Row groups fed to the stages ahead of what came back: enough that neither stage waits for the other.
GROUPS_AHEAD = 4


def _write_lines(batch: "pa.Table", pending: list[dict[str, Any]], served: "_Named", output: Any, errors_out: Any,
                 outcome: Outcome) -> list[dict[str, Any]]:
    """Each complete line of `batch` (after the inputs of `pending`) answered; returns the incomplete line's rows."""
    import numpy as np

    from serve_app.serving import Embedded, embedding_response

    columns = {name: batch.column(name).to_pylist() for name in
               ("custom_id", "count", "encoding_format", "kind", _TOKENS_USED, _FAILURE)}
    embedding = batch.column("embedding").combine_chunks()
    ok = np.asarray(embedding.is_valid(), dtype=bool)
    width = len(embedding[int(np.argmax(ok))]) if ok.any() else 0
    dense = np.asarray(embedding.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width) \
        if width else np.zeros((0, 0), dtype=np.float32)
    position = np.cumsum(ok) - 1  # row -> its vector's row in `dense`
    for r in range(batch.num_rows):
        pending.append({name: values[r] for name, values in columns.items()} |
                       {"vector": dense[position[r]] if ok[r] else None})
        if len(pending) < pending[0]["count"]:
            continue
        line, pending = pending, []
        failure = next((x[_FAILURE] for x in line if x[_FAILURE] is not None), None)
        if failure is not None:
            status, body = json.loads(failure)
            errors_out.write(_error_line(line[0]["custom_id"], status, body))
            outcome.failed += 1
            # the line's other inputs were encoded all the same: billed, as the online route bills work done
            # before a failure
            done = [x for x in line if x[_FAILURE] is None]
            outcome.input_tokens += sum(x[_TOKENS_USED] for x in done)
            outcome.images += sum(x["kind"] == "image" for x in done)
            continue
        tokens = sum(x[_TOKENS_USED] for x in line)
        embedded = Embedded(vectors=np.stack([x["vector"] for x in line]), prompt_tokens=tokens)
        body = embedding_response(served, embedded, line[0]["encoding_format"]).model_dump_json()
        output.write(_ok_line(line[0]["custom_id"], body))
        outcome.completed += 1
        outcome.input_tokens += tokens
        outcome.images += sum(x["kind"] == "image" for x in line)
    return pending


@dataclass(frozen=True)
class _Named:
    name: str
