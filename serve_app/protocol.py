"""Wire types of the HTTP API: pydantic models only, in OpenAI's field order.

Fields that OpenAI does not define (the dialects CLIP users already send) sit below the
`# --- extensions ---` marker of each model.
"""

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, StrictBool, StrictFloat, Tag, ValidationError,
    ValidatorFunctionWrapHandler, WrapValidator, field_validator,
)
from pydantic_core import PydanticCustomError

from serve_app.errors import InvalidRequest


def _valid_unicode(value: Any) -> Any:
    """Strings must be valid Unicode: JSON may carry lone surrogates (`"\\ud800"`), which no tokenizer,
    log line or UTF-8 response can hold."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("string is not valid Unicode (it holds a lone surrogate)") from None
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (str, list)):
                _valid_unicode(item)
    return value


@dataclass
class ListLimits:
    """Items per list field of a request, checked on the raw JSON list before any item is validated: a list
    of items that each fail every branch of a union costs one error per branch, so its length is what
    bounds validation time and memory. Set by the ingress replica from its config (`configure_list_limits`)."""

    inputs: int = 2048  # `input`, `messages` (all their content parts together) and `documents`
    labels: int = 4096
    templates: int = 128


LIST_LIMITS = ListLimits()
# A long list is validated in slices of this many items, and stops at the first slice with a bad item.
VALIDATION_SLICE = 64
MAX_REPORTED_ERRORS = 8


def configure_list_limits(inputs: int, labels: int, templates: int) -> None:
    """Sets this process's LIST_LIMITS (module-level, as ingress.configure_guard, for the same reason)."""
    LIST_LIMITS.inputs, LIST_LIMITS.labels, LIST_LIMITS.templates = inputs, labels, templates


def check_count(count: int, max_items: int, param: str) -> None:
    """A list field must be non-empty and within its per-request cap."""
    if count == 0:
        raise InvalidRequest(f"`{param}` must contain at least one item", param=param)
    if count > max_items:
        raise InvalidRequest(
            f"`{param}` has {count} items; this server accepts at most {max_items} per request", param=param
        )


def _validate_in_slices(value: list, handler: ValidatorFunctionWrapHandler) -> list:
    """Validates a long list slice by slice and stops at the first slice that fails, reporting at most
    MAX_REPORTED_ERRORS errors with their positions in the whole list."""
    if len(value) <= VALIDATION_SLICE:
        return handler(value)
    result: list = []
    for start in range(0, len(value), VALIDATION_SLICE):
        try:
            result.extend(handler(value[start : start + VALIDATION_SLICE]))
        except ValidationError as exc:
            errors = [
                {"type": PydanticCustomError(e["type"], e["msg"]), "loc": (e["loc"][0] + start, *e["loc"][1:]),
                 "input": e["input"]}
                for e in exc.errors(include_url=False)[:MAX_REPORTED_ERRORS]
            ]
            raise ValidationError.from_exception_data(exc.title, errors) from None
    return result


def bounded_list(field: str, limit: str) -> WrapValidator:
    """A list field whose length is checked against `LIST_LIMITS.<limit>` before its items are validated."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if not isinstance(value, list):
            return handler(value)
        check_count(len(value), getattr(LIST_LIMITS, limit), field)
        return _validate_in_slices(value, handler)

    return WrapValidator(check)


def _bounded_messages(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """`messages`: the messages and all their content parts together count against the inputs' cap."""
    if not isinstance(value, list):
        return handler(value)
    check_count(len(value), LIST_LIMITS.inputs, "messages")
    parts = sum(len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), list) else 1
                for m in value)
    check_count(parts, LIST_LIMITS.inputs, "messages")
    return _validate_in_slices(value, handler)


def _json_integer(value: Any) -> Any:
    """An integer as JSON Schema defines one (1 and 1.0), not a boolean or a numeric string (pydantic's lax int
    would take `true` and `"5"`)."""
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not (value.is_integer() and abs(value) <= 2**53):  # beyond 2**53 a float is no exact integer
            raise ValueError("must be an integer")
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]


class WireModel(BaseModel):
    """Base of every request model: unknown fields are ignored, as OpenAI-compatible servers do; every
    string field, and strings in lists, must be valid Unicode."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @field_validator("*", mode="after")
    @classmethod
    def _no_lone_surrogates(cls, value: Any) -> Any:
        return _valid_unicode(value)


# ---------------------------------------------------------------- input items (all dialects)


class ImageURL(WireModel):
    url: str
    detail: str | None = None


class TextPart(WireModel):
    """OpenAI content part `{"type": "text", "text": ...}`."""

    type: Literal["text"]
    text: str


class ImagePart(WireModel):
    """OpenAI content part `{"type": "image_url", "image_url": {"url": ...}}` (a bare string is taken too)."""

    type: Literal["image_url"]
    image_url: ImageURL | str


class JinaText(WireModel):
    """Jina-style `{"text": ...}`."""

    text: str


class JinaImage(WireModel):
    """Jina-style `{"image": ...}`: a data URI or bare base64."""

    image: str


def _object_kind(value: Any) -> str | None:
    # Tags are not identifiers, so that error locations can drop them (see errors.param_from_loc).
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "text":
            return "text-part"
        if kind == "image_url":
            return "image-part"
        if "image" in value:
            return "jina-image"
        if "text" in value:
            return "jina-text"
        return None
    tags = ((TextPart, "text-part"), (ImagePart, "image-part"), (JinaImage, "jina-image"), (JinaText, "jina-text"))
    for model, tag in tags:
        if isinstance(value, model):
            return tag
    return None


InputObject = Annotated[
    Union[
        Annotated[TextPart, Tag("text-part")],
        Annotated[ImagePart, Tag("image-part")],
        Annotated[JinaImage, Tag("jina-image")],
        Annotated[JinaText, Tag("jina-text")],
    ],
    Discriminator(
        _object_kind,
        custom_error_type="invalid_input_object",
        custom_error_message=(
            "an input object must be {'type': 'text', 'text': ...}, {'type': 'image_url', 'image_url': "
            "{'url': ...}}, {'text': ...} or {'image': ...}"
        ),
    ),
]

@dataclass(frozen=True)
class TokenIds:
    """A list of token ids where an input was expected: kept as its length only, for a clear error naming it."""

    count: int


def _token_ids(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A list is taken as token ids without validating its (possibly millions of) items."""
    return TokenIds(len(value)) if isinstance(value, list) else handler(value)


# Token ids are accepted on the wire only so that they get a clear error, not a generic type error.
InputItem = Union[str, InputObject, int, Annotated[list[int], WrapValidator(_token_ids)]]


class ChatMessage(WireModel):
    """vLLM's `messages` dialect: each content part becomes one input."""

    role: str = "user"
    content: str | list[InputObject]


# ---------------------------------------------------------------- /v1/embeddings


InputList = Annotated[list[InputItem], bounded_list("input", "inputs")]
Messages = Annotated[list[ChatMessage], WrapValidator(_bounded_messages)]


class EmbeddingRequest(WireModel):
    input: str | InputList | None = None
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: JsonInt | None = None
    user: str | None = None
    # --- extensions ---
    modality: Literal["text", "image"] | None = Field(
        default=None, description="infinity's dialect: with 'image', plain strings are images."
    )
    messages: Messages | None = Field(
        default=None, description="vLLM's dialect: chat-style content parts instead of `input`."
    )


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class EmbeddingResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("embd"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[Embedding]
    usage: Usage


# ---------------------------------------------------------------- /v1/classify (zero-shot)


TemplateList = Annotated[list[str], bounded_list("prompt_templates", "templates")]


class ClassifyRequest(WireModel):
    model: str | None = None
    input: str | InputList | None = None
    labels: Annotated[list[str], bounded_list("labels", "labels")] = Field(
        description="class names; each becomes one classifier vector"
    )
    prompt_templates: TemplateList | Literal["imagenet"] | None = Field(
        default=None,
        description="strings containing '{}' (default: 'a photo of a {}.'), or 'imagenet' for open_clip's "
        "80 OpenAI ImageNet templates",
    )
    top_k: JsonInt | None = Field(default=None, ge=1)
    # --- extensions ---
    modality: Literal["text", "image"] | None = None
    messages: Messages | None = None


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    object: Literal["classification"] = "classification"
    index: int
    prediction: str
    score: float
    predictions: list[LabelScore]


class ClassifyResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("clf"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[Classification]
    usage: Usage


# ---------------------------------------------------------------- /v1/rerank (cross-modal)

RerankItem = Union[str, InputObject]


class RerankRequest(WireModel):
    model: str | None = None
    query: RerankItem
    documents: Annotated[list[RerankItem], bounded_list("documents", "inputs")]
    top_n: JsonInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Any = None


class RerankResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("rerank"))
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    results: list[RerankResult]
    usage: Usage


# ---------------------------------------------------------------- /v1/models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "serve_app"
    # --- extensions ---
    embedding_dimensions: int
    context_length: int
    image_size: list[int]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- errors and health


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PoolHealth(BaseModel):
    ok: bool
    last_encode_age_s: float | None = None
    detail: str | None = None


class CreditGrant(WireModel):
    """An admin's top-up of a key's credit (negative: a correction)."""

    amount_usd: StrictFloat = Field(ge=-1_000_000, le=1_000_000, allow_inf_nan=False)  # not `true`, not "5"
    note: str = Field(default="", max_length=200)


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    models: dict[str, PoolHealth]
