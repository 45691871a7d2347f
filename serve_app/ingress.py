"""OpenAIIngress deployment: thin OpenAI-style HTTP routes over the preprocessing and encoder pools.

Every request passes `EveryRequest` (the key and its limits, the body cap, the deadline, metrics and the one error
mapper); tenancy (serve_app/tenancy/) is called from there only.
Routes parse, await the service, and build the response.
"""

import asyncio
import json
import logging
import sys
import time
import uuid
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import metrics
from serve_app.auth import OPEN_ROUTES, bearer_token, open_network_warning, resolve_api_keys
from serve_app.batch.protocol import Batch, BatchCreate, FileDeleted, FileObject, ListPage
from serve_app.config import (
    BatchAPISettings, ImageLimits, ImageURLPolicy, ModelSpec, RequestLimits, TenancySettings, ZeroShotSettings,
)
from serve_app.errors import (
    DeadlineExceeded, InvalidRequest, NotFound, TooManyInFlight, PayloadTooLarge, RequestTimeout, error_body, error_payload,
    find_app_error, validation_failure,
)
from serve_app.in_process import in_process_pools
from serve_app import loop_lag
from serve_app.tenancy import gate as tenancy_gate
from serve_app.tenancy.gate import Tenancy, Tenant, prompt_token_bound, token_bound
from serve_app.tenancy.keys import KeyRing
from serve_app.tenancy.usage_api import UsagePage, UsageQuery
from serve_app.inputs import ImageInput, TextInput, check_request_budget, collect_inputs, input_from_item
from serve_app.modeling import get_tokenizer, load_model_config
from serve_app.openapi import refine
from serve_app.protocol import (
    ClassifyRequest,
    CreditGrant,
    configure_list_limits,
    ClassifyResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    PoolHealth,
    RerankRequest,
    RerankResponse,
)
from serve_app.serving import ClipService, ServedModel, check_dimensions, embedding_response, off_loop
from serve_app.zero_shot import (
    check_labels, check_prompt_chars, check_prompt_count, check_scores, prompt_lines, resolve_templates,
)

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 10.0
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 422, 429, 500, 503, 504)
}

app = FastAPI(
    title="CLIP embeddings (OpenAI-compatible)",
    description="OpenCLIP image and text embeddings behind an OpenAI-style API, served by Ray Serve.",
    version="0.1.0",
)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if hasattr(payload, "model_dump_json"):
        return Response(payload.model_dump_json(), status_code=status, media_type="application/json", headers=headers)
    # ASCII-escaped: an error that quotes a client's string stays valid UTF-8 even if the string was not.
    body = json.dumps(payload, ensure_ascii=True, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _rerank_json(response: RerankResponse) -> Response:
    return Response(response.model_dump_json(exclude_none=True), media_type="application/json")


def _embedding_json(model: ServedModel, embedded: Any, encoding_format: str) -> Response:
    return _json(embedding_response(model, embedded, encoding_format))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    mapped = validation_failure(exc.errors())
    return _json(mapped.body, mapped.status_code)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    cause = find_app_error(exc)  # FastAPI wraps what reading the body raised (the body size cap) in a 400
    if cause is not None:
        mapped = error_payload(cause)
        if mapped.reason is not None:
            path = _route_path(request.scope)
            metrics.count_rejected(path if path in KNOWN_ROUTES else "other", mapped.reason)
        return _json(mapped.body, mapped.status_code, mapped.headers)
    # Starlette's own headers (a 405's `Allow`) go out with our body
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request.scope))
    return _json(error_body(exc.status_code, str(exc.detail), "invalid_request_error").body, exc.status_code,
                 headers)


def _allowed_methods(scope: Any) -> list[str]:
    """Every method some route serves at this path: Starlette's `Allow` names only the first route's, and a path
    such as /v1/files has one route per method."""
    from starlette.routing import Match

    methods: set[str] = set()
    for route in app.routes:
        match, _ = route.matches(scope)
        if match in (Match.FULL, Match.PARTIAL):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


FILES_PREFIX = "/v1/files"
KNOWN_ROUTES = {"/v1/embeddings", "/v1/classify", "/v1/rerank", "/v1/models", "/health", "/livez", "/openapi.json",
                "/docs", "/v1/organization/usage/embeddings", "/v1/organization/api_keys",
                FILES_PREFIX, "/v1/batches"}


class _Guard:
    """What `EveryRequest` enforces before any route runs; set by the ingress replica's constructor (one
    ingress per process). Until then nothing is served, so the defaults never answer a request."""

    tenancy: Tenancy | None = None  # keys, their limits and credit, usage records; None: an open service
    max_body_bytes: int = RequestLimits().max_body_bytes
    body_read_timeout_s: float = RequestLimits().body_read_timeout_s
    request_timeout_s: float | None = None  # the server's deadline per request
    max_json_values: int = RequestLimits().max_json_values
    max_requests_in_flight: int = 1 << 30  # admission control: beyond it, 429 in OpenAI's shape
    in_flight: int = 0
    # The Files API (batch.enabled): uploads up to this many bytes, and file transfers within this many seconds
    # instead of the request deadline and the body's read timeout. None: no Files API.
    file_body_bytes: int | None = None
    transfer_timeout_s: float = 900.0

    def bounds(self, path: str, method: str) -> tuple[int, float, int, float | None]:
        """(body bytes, body read timeout, JSON values, deadline) of a request: a file upload is not JSON and a
        transfer of hundreds of megabytes takes longer than any API call."""
        if self.file_body_bytes is not None and path.startswith(FILES_PREFIX):
            if method == "POST" and path == FILES_PREFIX:
                return self.file_body_bytes, self.transfer_timeout_s, 1 << 62, self.transfer_timeout_s
            return self.max_body_bytes, self.body_read_timeout_s, self.max_json_values, self.transfer_timeout_s
        return self.max_body_bytes, self.body_read_timeout_s, self.max_json_values, self.request_timeout_s


# Multipart framing around an uploaded file: its boundaries and the `purpose` field.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
GUARD = _Guard()


def configure_guard(tenancy: Tenancy | None, max_body_bytes: int, body_read_timeout_s: float,
                    request_timeout_s: float | None = None, max_json_values: int | None = None,
                    max_requests_in_flight: int | None = None) -> None:
    """Sets this process's GUARD. Called from the replica's constructor through this module-level function:
    Ray Serve pickles the deployment class by value, so a constructor that named GUARD itself would set a
    copy, not the one `EveryRequest` reads."""
    # A JSON integer of thousands of digits costs quadratic time to parse, in any field, ignored ones too; 640
    # digits (Python's floor for this bound) is far beyond any number the API reads.
    sys.set_int_max_str_digits(640)
    GUARD.tenancy = tenancy
    GUARD.max_body_bytes = max_body_bytes
    GUARD.body_read_timeout_s = body_read_timeout_s
    GUARD.request_timeout_s = request_timeout_s
    if max_json_values is not None:
        GUARD.max_json_values = max_json_values
    if max_requests_in_flight is not None:
        GUARD.max_requests_in_flight = max_requests_in_flight


def configure_file_transfers(max_body_bytes: int, timeout_s: float) -> None:
    """The Files API's bounds in this process's GUARD (module-level, as configure_guard, for the same reason)."""
    GUARD.file_body_bytes = max_body_bytes
    GUARD.transfer_timeout_s = timeout_s


def _refuse(scope: Any, receive: Any, send: Any, status: int, message: str, error_type: str = "invalid_request_error",
            headers: dict[str, str] | None = None) -> Any:
    return _json(error_body(status, message, error_type).body, status, headers)(scope, receive, send)


def _route_path(scope: Any) -> str:
    """The path below the application's route prefix (Serve passes the prefix as `root_path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _body_cap(receive: Any, limit: int, timeout_s: float, max_json_values: int) -> Any:
    """`receive` that counts body bytes and fails once they pass `limit` (a chunked body has no length), or
    once the body has taken longer than `timeout_s` from the request's start to arrive (a trickling client).

    It also counts the body's commas, braces and brackets as they arrive, an upper bound of the number of JSON
    values it holds (strings' own commas count too): parsing costs time and memory per value (`[{},{},...]`
    in 32 MiB is ten million dicts), so a body with too many is refused before it is parsed."""
    seen = 0
    values = 0
    deadline = time.monotonic() + timeout_s
    done = False

    async def capped() -> dict:
        nonlocal seen, done, values
        if done:  # after the body only a disconnect can come: no deadline on waiting for it
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {timeout_s:g}s") from None
        if message["type"] == "http.request":
            done = not message.get("more_body", False)
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                raise PayloadTooLarge(f"request body is larger than the {limit} byte limit")
            values += chunk.count(b",") + chunk.count(b"{") + chunk.count(b"[")
            if values > max_json_values:
                raise PayloadTooLarge(
                    f"request body holds more than {max_json_values} JSON values (commas, braces and brackets "
                    "counted); send fewer items per request"
                )
            if done and capped.on_complete is not None:
                capped.on_complete()
        return message

    capped.on_complete = None  # type: ignore[attr-defined]
    return capped


class EveryRequest:
    """The one place every request passes: the deadline, the error mapper and request metrics.

    A plain ASGI middleware (Starlette's `@app.middleware("http")` adds a task and a memory stream to every
    request). Ray Serve's proxy already gives every request an `x-request-id` (the client's, or a new one) and
    echoes it in the response; errors quote it so that a log line can be found from a client's report.

    The server's deadline (`request_timeout_s` of the app, in GUARD) is enforced here so that a late
    request gets OpenAI's error shape, and so that no client header lifts it: Ray's HTTP entry lets
    `x-request-timeout-seconds: 0` switch its own timeout (`http_options.request_timeout_s`, a little longer
    here, the backstop) off. Ray cancels the requests of clients that go away, and drops their calls from the
    encoder's batch queue; a client that turns that watch off (`x-request-disconnect-disabled: ?1`) still ends
    at the deadline.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop_lag.REPLICA_LOOP.ensure_started()
        start = time.perf_counter()
        status = 500
        started = False
        admitted = False
        headers = Headers(scope=scope)
        path = _route_path(scope)
        route = path if path in KNOWN_ROUTES else "other"

        async def send_and_watch(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                if tenant is not None:  # the reservation settled; OpenAI's rate-limit headers on every answer
                    own = list(message.get("headers", []))
                    present = {name.lower() for name, _ in own}
                    message["headers"] = own + [h for h in await _settled(tenancy, tenant) if h[0] not in present]
            await send(message)

        tenant: Tenant | None = None
        context = None
        tenancy = GUARD.tenancy
        try:
            if tenancy is not None and tenancy.enabled and path not in OPEN_ROUTES:
                tenancy.ensure_started()
                authorization = headers.get("authorization")
                # the usage record's id is ours: a client's x-request-id may repeat, and records are idempotent
                request_id = "req_" + uuid.uuid4().hex
                tenant = tenancy.authenticate(authorization, bearer_token(authorization), path, request_id)
                context = tenancy_gate.CURRENT.set(tenant)
                await tenancy.admit(tenant)
            max_body, read_timeout, max_values, deadline = GUARD.bounds(path, scope.get("method", ""))
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    status = 400
                    await _refuse(scope, receive, send, 400, "invalid Content-Length header")
                    return
                if int(length) > max_body:  # before a byte of the body is read
                    status = 413
                    metrics.count_rejected(route, "too_large")
                    await _refuse(scope, receive, send, 413,
                                  f"request body is {int(length)} bytes; the limit is {max_body}")
                    return
            body = _body_cap(receive, max_body, read_timeout, max_values)

            def admit() -> None:
                """Counts the request in flight once its body has arrived (a client trickling a body holds a
                connection, not a place in admission); past the bound, 429 in OpenAI's shape."""
                nonlocal admitted
                if admitted or path in OPEN_ROUTES or path == "/health":  # probes: answered whatever the load
                    return
                if GUARD.in_flight >= GUARD.max_requests_in_flight:
                    raise TooManyInFlight(
                        "The server is overloaded: too many requests in flight. Retry after a moment.")
                GUARD.in_flight += 1
                admitted = True

            body.on_complete = admit
            if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
                admit()
            await self._bounded(scope, body, send_and_watch, deadline)
        except Exception as exc:  # the one error mapper
            request_id = headers.get("x-request-id") or uuid.uuid4().hex
            mapped = error_payload(exc, request_id)
            if mapped.status_code >= 500 and mapped.reason is None:  # refusals are counted, not logged
                logger.exception("request %s failed", request_id)
            if mapped.reason is not None:
                metrics.count_rejected(route, mapped.reason)
            if started:  # too late to answer differently; the client sees a cut response
                raise
            status = mapped.status_code
            await _json(mapped.body, mapped.status_code, mapped.headers)(scope, receive, send_and_watch)
        finally:
            if admitted:
                GUARD.in_flight -= 1
            if tenant is not None:
                tenancy.finish(tenant, status)  # type: ignore[union-attr]
                tenancy_gate.CURRENT.reset(context)  # type: ignore[arg-type]
            metrics.observe_request(route, status, time.perf_counter() - start)

    async def _bounded(self, scope: Any, receive: Any, send: Any, timeout: float | None) -> None:
        """Runs the app within the server's deadline."""
        if timeout is None:
            await self.app(scope, receive, send)
            return
        try:
            await asyncio.wait_for(self.app(scope, receive, send), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"The request did not complete within the server's deadline of {timeout:g} s."
            ) from None


async def _reserve(model: ServedModel, inputs: list[Any], extra_tokens: int = 0) -> None:
    """Holds what the request may cost against its key's per-minute limits, before any work (no-op without
    tenancy): a bound of its text tokens (the prompts of labels not cached included) and its images."""
    tenant = tenancy_gate.CURRENT.get()
    if tenant is None or GUARD.tenancy is None:
        return
    context = model.config.context_length
    tokens = extra_tokens + sum(token_bound(x.text, context) for x in inputs if isinstance(x, TextInput))
    images = sum(isinstance(x, ImageInput) for x in inputs)
    await GUARD.tenancy.reserve(tenant, tokens, images, model.name)


async def _settled(tenancy: Any, tenant: Tenant) -> list[tuple[bytes, bytes]]:
    """The answer's rate-limit headers; a limiter that fails now (Redis gone mid-request) costs the headers,
    never the answer."""
    try:
        return await tenancy.settle(tenant)
    except Exception as exc:
        logger.warning("rate-limit headers of request %s not computed: %s", tenant.request_id, exc)
        return []


app.add_middleware(EveryRequest)

_SERVED: dict[str, Any] = {"models": {}, "limits": RequestLimits()}


def configure_openapi(models: dict[str, int], limits: RequestLimits) -> None:
    """What `/openapi.json` states of this replica's models and limits (module-level, as configure_guard)."""
    _SERVED["models"], _SERVED["limits"] = dict(models), limits
    app.openapi_schema = None


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        limits = _SERVED["limits"]
        app.openapi_schema = refine(document, _SERVED["models"], limits.max_text_chars, limits.max_template_chars)
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


def _warn_if_open(keys: bool) -> None:
    """A loud warning when Serve's HTTP options bind beyond loopback and no API keys are set. The bind host
    is Serve's (`http_options.host`, what HAProxy and this replica's own HTTP server bind), asked of the
    controller; if it cannot be asked, nothing is claimed."""
    try:
        from ray.serve.context import _get_global_client

        options = _get_global_client().http_config
        host, port = options.host, options.port
    except Exception:  # not under a Serve controller (unit tests, the bare benchmark)
        return
    warning = open_network_warning(host, port, keys)
    if warning:
        logger.warning(warning)
        print(warning, flush=True)  # also on the replica's stderr, which `serve run` shows


# Ray options come from the pool settings (serve_app/config.py, POOL_DEFAULTS), applied by build_app.
@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    def __init__(
        self,
        preprocessor: Any,
        encoders: dict[str, Any],
        models: list[ModelSpec],
        max_inputs_per_request: int,
        zero_shot: ZeroShotSettings,
        image_limits: ImageLimits | None = None,
        limits: RequestLimits | None = None,
        api_keys: list[str] | None = None,
        api_keys_file: str | None = None,
        image_url_policy: ImageURLPolicy = "off",
        request_timeout_s: float | None = None,
        max_requests_in_flight: int | None = None,
        tenancy: TenancySettings | None = None,
        ingress_replicas: int = 1,
        batch: BatchAPISettings | None = None,
        batch_runner: Any = None,
    ) -> None:
        """`preprocessor` and `encoders` are handles of the other pools, or None in the one-process
        layout: then this replica builds them itself (`in_process_pools`) from `models` and `image_limits`.

        API keys are resolved here (args, CLIP_API_KEYS, the plain keys file; the tenancy keys file), in the
        replica, never at import."""
        self._limits = limits or RequestLimits()
        self._url_policy = image_url_policy
        keys = resolve_api_keys(api_keys, api_keys_file)
        self._tenancy = Tenancy(tenancy or TenancySettings(), KeyRing.from_secrets(keys), ingress_replicas)
        configure_guard(self._tenancy, self._limits.max_body_bytes, self._limits.body_read_timeout_s,
                        request_timeout_s, self._limits.max_json_values, max_requests_in_flight)
        configure_list_limits(max_inputs_per_request, zero_shot.max_labels, zero_shot.max_templates)
        self._batch_api = None
        self._batch_runner = batch_runner  # deployed with the app; it takes its work from the database
        if batch is not None and batch.enabled:
            from serve_app.batch.runner import database_url
            from serve_app.batch.service import BatchAPI

            self._batch_api = BatchAPI(batch, database_url(tenancy or TenancySettings()))
            configure_file_transfers(batch.max_file_bytes + MULTIPART_OVERHEAD_BYTES, batch.transfer_timeout_s)
        logger.info("API keys: %d configured", len(self._tenancy.ring))  # the count, never a key
        _warn_if_open(len(self._tenancy.ring) > 0)
        self._in_process: list[Any] = []
        if preprocessor is None:
            preprocessor, encoders = in_process_pools(
                models, image_limits or ImageLimits(), self._limits, image_url_policy
            )
            self._in_process = [handle.target for handle in encoders.values()]
        served = {
            spec.name: ServedModel(spec.name, load_model_config(spec.model, spec.pretrained), encoders[spec.name],
                                   get_tokenizer(spec.model), spec.batching)
            for spec in models
        }
        self._service = ClipService(preprocessor, served, zero_shot)
        configure_openapi({name: m.config.embed_dim for name, m in served.items()}, self._limits)
        self._max_inputs = max_inputs_per_request

    def loop_lag(self, reset: bool = False) -> dict[str, float]:
        """The worst lag of this replica's event loop since it started (or the last reset)."""
        return loop_lag.REPLICA_LOOP.report(reset)

    def reconfigure(self, user_config: dict) -> None:
        """One-process layout: the encoder's batching (`user_config`), changed without a restart."""
        for encoder in self._in_process:
            encoder.reconfigure(user_config)

    def in_process_info(self) -> dict[str, dict]:
        """One-process layout: what each encoder in this replica runs with (`ClipEncoder.info`)."""
        return {info["model"]: info for info in (encoder.info() for encoder in self._in_process)}

    def check_health(self) -> None:
        """One-process layout: Ray Serve replaces this replica when its encoder keeps failing."""
        for encoder in self._in_process:
            encoder.check_health()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """One-process layout: the in-process encoder's queue depth, for the queue-depth policy (the pool then
        is this deployment). Empty in the pools layout: that policy is not this pool's."""
        stats: dict[str, float] = {}
        for encoder in self._in_process:
            for key, value in encoder.record_autoscaling_stats().items():
                stats[key] = stats.get(key, 0.0) + value
        return stats

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
    async def create_embeddings(self, request: EmbeddingRequest) -> Response:
        model = self._service.model(request.model)
        check_dimensions(model, request.dimensions)
        inputs = collect_inputs(request, self._max_inputs, self._url_policy)
        check_request_budget(inputs, self._limits)
        await _reserve(model, inputs)
        embedded = await self._service.embed(model, inputs)
        return await off_loop(embedded.vectors.size, _embedding_json, model, embedded, request.encoding_format)

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
    async def classify(self, request: ClassifyRequest) -> Response:
        """Zero-shot classification of each input over `labels`, as open_clip's zero-shot evaluation."""
        model = self._service.model(request.model)
        templates = resolve_templates(
            request.prompt_templates, self._service.zero_shot.max_templates, self._limits.max_template_chars
        )
        check_labels(request.labels, self._service.zero_shot.max_labels, self._limits.max_text_chars)
        check_prompt_count(len(request.labels), len(templates), self._limits.max_prompts_per_request)
        check_prompt_chars(request.labels, templates, self._limits.max_request_prompt_chars)
        inputs = collect_inputs(request, self._max_inputs, self._url_policy)
        check_scores(len(inputs), len(request.labels), request.top_k, self._limits.max_response_scores)
        check_request_budget(inputs, self._limits, extra_text_chars=sum(map(len, request.labels)),
                             extra_text_lines=prompt_lines(request.labels, templates))
        uncached = self._service.uncached_labels(model, request.labels, templates)
        await _reserve(model, inputs, prompt_token_bound(uncached, templates, model.config.context_length))
        response = await self._service.classify(model, inputs, request.labels, templates, request.top_k)
        return await off_loop(len(response.data) * len(response.data[0].predictions), _json, response)

    @app.post("/v1/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
    async def rerank(self, request: RerankRequest) -> Response:
        """Documents (text or images) ordered by cosine similarity to the query (text or image)."""
        model = self._service.model(request.model)
        query = input_from_item(request.query, "query", url_policy=self._url_policy)
        documents = [
            input_from_item(d, f"documents[{i}]", url_policy=self._url_policy) for i, d in enumerate(request.documents)
        ]
        check_request_budget([query, *documents], self._limits)
        await _reserve(model, [query, *documents])
        originals = [d if isinstance(d, str) else d.model_dump(exclude_none=True) for d in request.documents]
        response = await self._service.rerank(
            model, query, documents, originals, request.top_n, request.return_documents
        )
        return await off_loop(len(response.results) * (64 if request.return_documents else 1), _rerank_json, response)

    # ------------------------------------------------------------------ Files and Batch API (serve_app/batch/)

    def _batches(self) -> Any:
        if self._batch_api is None:
            raise NotFound("the Files and Batch API is not enabled on this server (batch.enabled)")
        return self._batch_api

    @app.post(FILES_PREFIX, response_model=FileObject, responses=ERROR_RESPONSES)
    async def upload_file(self, request: Request) -> Response:
        """A .jsonl batch input file (multipart `file`, `purpose=batch`), as OpenAI's Files API."""
        api = self._batches()
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
        except Exception as exc:
            if find_app_error(exc) is not None:
                raise
            raise InvalidRequest(f"the upload must be multipart form data with `file` and `purpose`: {exc}",
                                 param="file") from None
        try:
            return _json(await api.upload(form))
        finally:
            await form.close()

    @app.get(FILES_PREFIX, response_model=ListPage, responses=ERROR_RESPONSES)
    async def list_files(self, purpose: str | None = None, after: str | None = None,
                         limit: int = Query(10_000, ge=1, le=10_000),
                         order: str = Query("desc", pattern="^(asc|desc)$")) -> Response:
        return _json(await self._batches().files(purpose, after, limit, order))

    @app.get(FILES_PREFIX + "/{file_id}", response_model=FileObject, responses=ERROR_RESPONSES)
    async def get_file(self, file_id: str) -> Response:
        return _json(await self._batches().file(file_id))

    @app.get(FILES_PREFIX + "/{file_id}/content", responses=ERROR_RESPONSES)
    async def file_content(self, file_id: str) -> Response:
        """The file's bytes, streamed from the store."""
        chunks = await self._batches().content(file_id)
        return StreamingResponse(chunks, media_type="application/octet-stream")

    @app.delete(FILES_PREFIX + "/{file_id}", response_model=FileDeleted, responses=ERROR_RESPONSES)
    async def delete_file(self, file_id: str) -> Response:
        return _json(await self._batches().delete(file_id))

    @app.post("/v1/batches", response_model=Batch, responses=ERROR_RESPONSES)
    async def create_batch(self, request: BatchCreate) -> Response:
        return _json(await self._batches().create(request))

    @app.get("/v1/batches", response_model=ListPage, responses=ERROR_RESPONSES)
    async def list_batches(self, after: str | None = None, limit: int = Query(20, ge=1, le=100)) -> Response:
        return _json(await self._batches().batches(after, limit))

    @app.get("/v1/batches/{batch_id}", response_model=Batch, responses=ERROR_RESPONSES)
    async def get_batch(self, batch_id: str) -> Response:
        return _json(await self._batches().batch(batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", response_model=Batch, responses=ERROR_RESPONSES)
    async def cancel_batch(self, batch_id: str) -> Response:
        return _json(await self._batches().cancel(batch_id))

    # ------------------------------------------------------------------ admin (admin keys only: EveryRequest)

    @app.get("/v1/organization/usage/embeddings", response_model=UsagePage, responses=ERROR_RESPONSES)
    async def usage_embeddings(self, request: Request) -> Response:
        """OpenAI's Usage API for embeddings: buckets of input tokens, requests and (ours) images."""
        tenancy = self._tenancy_on()
        try:
            query = UsageQuery.from_query_items(request.query_params.multi_items())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        return _json(await tenancy.store.usage(query))

    @app.get("/v1/organization/api_keys", responses=ERROR_RESPONSES)
    async def list_api_keys(self) -> Response:
        """Every key's id, name, limits and remaining credit; never a secret or its hash."""
        keys = self._tenancy_on().list_keys()
        return _json({"object": "list", "data": keys, "first_id": keys[0]["id"] if keys else None,
                      "last_id": keys[-1]["id"] if keys else None, "has_more": False})

    @app.post("/v1/organization/api_keys/{key_id}/credit", responses=ERROR_RESPONSES)
    async def add_credit(self, key_id: str, grant: CreditGrant) -> Response:
        """Tops up (or, negative, corrects) a key's credit; every replica sees it within a second."""
        tenancy = self._tenancy_on()
        if key_id not in tenancy.ring.keys or tenancy.ring.keys[key_id].admin:
            raise NotFound(f"no API key with id {key_id}", param="key_id")
        left = await tenancy.top_up(key_id, grant.amount_usd, grant.note)
        return _json({"object": "organization.api_key.credit", "id": key_id, "credit_remaining_usd": left})

    def _tenancy_on(self) -> Tenancy:
        if not self._tenancy.enabled:
            raise NotFound("the organization routes need keys: this service has none configured")
        return self._tenancy

    @app.get("/livez")
    async def livez(self) -> Response:
        """Liveness: this replica's event loop answers. No API key needed, no pool is asked (a busy encoder
        is not a dead one)."""
        return _json({"status": "ok"})

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> Response:
        return _json(self._service.model_list())

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health(self) -> Response:
        """200 only when every encoder pool has completed a real encode recently (it probes if not)."""
        names = list(self._service.models)
        results = await asyncio.gather(*(self._pool_health(self._service.models[n]) for n in names))
        pools = dict(zip(names, results))
        ok = all(p.ok for p in pools.values())
        body = HealthResponse(status="ok" if ok else "unavailable", models=pools)
        return _json(body, 200 if ok else 503)

    @staticmethod
    async def _pool_health(model: ServedModel) -> PoolHealth:
        try:
            report = await asyncio.wait_for(model.encoder.health.remote(), HEALTH_TIMEOUT_S)
            return PoolHealth(**report)
        except asyncio.TimeoutError:
            return PoolHealth(ok=False, detail=f"no answer from the encoder pool within {HEALTH_TIMEOUT_S}s")
        except Exception as exc:
            return PoolHealth(ok=False, detail=f"encoder pool unreachable: {type(exc).__name__}")

