"""OpenAIIngress deployment: thin OpenAI-style HTTP routes over the preprocessing and encoder pools.

Every request passes `_every_request` (request id, metrics, the one error mapper); later concerns such as
API keys and rate limits belong there too. Routes parse, await the service, and build the response.
"""

import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import metrics
from serve_app.config import ImageLimits, ModelSpec, ZeroShotSettings
from serve_app.errors import error_body, error_payload
from serve_app.in_process import in_process_pools
from serve_app.inputs import check_count, collect_inputs, input_from_item
from serve_app.modeling import load_model_config
from serve_app.protocol import (
    ClassifyRequest,
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
from serve_app.serving import ClipService, ServedModel, check_dimensions, embedding_response
from serve_app.zero_shot import resolve_templates

logger = logging.getLogger("ray.serve")

HEALTH_TIMEOUT_S = 10.0
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 413, 422, 429, 500, 503)
}

app = FastAPI(
    title="CLIP embeddings (OpenAI-compatible)",
    description="OpenCLIP image and text embeddings behind an OpenAI-style API, served by Ray Serve.",
    version="0.1.0",
)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if hasattr(payload, "model_dump_json"):
        return Response(payload.model_dump_json(), status_code=status, media_type="application/json", headers=headers)
    return JSONResponse(payload, status_code=status, headers=headers)


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'input', 'list[...]', 3, 'image-part', 'image_url', 'ImageURL') -> 'input[3].image_url'.

    pydantic adds union branches to locations (type names, class names, our hyphenated tags); only
    field names (lower-case identifiers) and indexes name what the client sent.
    """
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part[0].islower() and part not in _TYPE_NAMES:
            param += ("." if param else "") + part
    return param or None


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    # Union types fail once per branch; the deepest location names the offending item best (input[3]).
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={"loc": (), "msg": "invalid request"})
    if first.get("type") == "json_invalid":
        return _json(error_body(400, "request body is not valid JSON", "invalid_request_error").body, 400)
    param = _param_from_loc(tuple(first.get("loc", ())))
    messages = "; ".join(dict.fromkeys([str(first.get("msg"))] + [str(e.get("msg")) for e in errors[:4]]))
    message = f"invalid value for `{param}`: {messages}" if param else f"invalid request: {messages}"
    if param is None and first.get("type") == "missing":
        message = "request body is required (JSON)"
    return _json(error_body(400, message, "invalid_request_error", param).body, 400)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return _json(error_body(exc.status_code, str(exc.detail), "invalid_request_error").body, exc.status_code)


KNOWN_ROUTES = {"/v1/embeddings", "/v1/classify", "/v1/rerank", "/v1/models", "/health", "/openapi.json", "/docs"}


class EveryRequest:
    """The one place every request passes: the error mapper and request metrics.

    A plain ASGI middleware (Starlette's `@app.middleware("http")` adds a task and a memory stream to every
    request). Ray Serve's proxy already gives every request an `x-request-id` (the client's, or a new one) and
    echoes it in the response; errors quote it so that a log line can be found from a client's report.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def send_and_watch(message: dict) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception as exc:  # the one error mapper
            request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex
            mapped = error_payload(exc, request_id)
            if mapped.status_code >= 500:
                logger.exception("request %s failed", request_id)
            if started:  # too late to answer differently; the client sees a cut response
                raise
            status = mapped.status_code
            await _json(mapped.body, mapped.status_code)(scope, receive, send)
        finally:
            route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
            metrics.observe_request(route, status, time.perf_counter() - start)


app.add_middleware(EveryRequest)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
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
    ) -> None:
        """`preprocessor` and `encoders` are handles of the other pools, or None in the one-process
        layout: then this replica builds them itself (`in_process_pools`) from `models` and `image_limits`."""
        self._in_process: list[Any] = []
        if preprocessor is None:
            preprocessor, encoders = in_process_pools(models, image_limits or ImageLimits())
            self._in_process = [handle.target for handle in encoders.values()]
        served = {
            spec.name: ServedModel(spec.name, load_model_config(spec.model, spec.pretrained), encoders[spec.name])
            for spec in models
        }
        self._service = ClipService(preprocessor, served, zero_shot)
        self._max_inputs = max_inputs_per_request

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

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERROR_RESPONSES)
    async def create_embeddings(self, request: EmbeddingRequest) -> Response:
        model = self._service.model(request.model)
        check_dimensions(model, request.dimensions)
        inputs = collect_inputs(request, self._max_inputs)
        embedded = await self._service.embed(model, inputs)
        return _json(embedding_response(model, embedded, request.encoding_format))

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
    async def classify(self, request: ClassifyRequest) -> Response:
        """Zero-shot classification of each input over `labels`, as open_clip's zero-shot evaluation."""
        model = self._service.model(request.model)
        templates = resolve_templates(request.prompt_templates, self._service.zero_shot.max_templates)
        inputs = collect_inputs(request, self._max_inputs)
        response = await self._service.classify(model, inputs, request.labels, templates, request.top_k)
        return _json(response)

    @app.post("/v1/rerank", response_model=RerankResponse, responses=ERROR_RESPONSES)
    async def rerank(self, request: RerankRequest) -> Response:
        """Documents (text or images) ordered by cosine similarity to the query (text or image)."""
        model = self._service.model(request.model)
        check_count(len(request.documents), self._max_inputs, "documents")
        query = input_from_item(request.query, "query")
        documents = [input_from_item(d, f"documents[{i}]") for i, d in enumerate(request.documents)]
        originals = [d if isinstance(d, str) else d.model_dump(exclude_none=True) for d in request.documents]
        response = await self._service.rerank(
            model, query, documents, originals, request.top_n, request.return_documents
        )
        body = response.model_dump_json(exclude_none=True)
        return Response(body, media_type="application/json")

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

    @app.get("/livez")
    async def livez(self) -> Response:
        """Liveness: this replica answers by itself, asking no pool (a busy encoder is not a dead one)."""
        return _json({"status": "ok"})

    @staticmethod
    async def _pool_health(model: ServedModel) -> PoolHealth:
        try:
            report = await asyncio.wait_for(model.encoder.health.remote(), HEALTH_TIMEOUT_S)
            return PoolHealth(**report)
        except asyncio.TimeoutError:
            return PoolHealth(ok=False, detail=f"no answer from the encoder pool within {HEALTH_TIMEOUT_S}s")
        except Exception as exc:
            return PoolHealth(ok=False, detail=f"encoder pool unreachable: {type(exc).__name__}")
