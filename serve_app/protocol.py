"""Wire types of the HTTP API: pydantic models only, in OpenAI's field order.

Fields that OpenAI does not define (the dialects CLIP users already send) sit below the
`# --- extensions ---` marker of each model.
"""

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator


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
    # Tags are not identifiers, so that error locations can drop them (see ingress._param_from_loc).
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

# Token ids are accepted on the wire only so that they get a clear error, not a generic type error.
InputItem = Union[str, InputObject, int, list[int]]


class ChatMessage(WireModel):
    """vLLM's `messages` dialect: each content part becomes one input."""

    role: str = "user"
    content: str | list[InputObject]


# ---------------------------------------------------------------- /v1/embeddings


class EmbeddingRequest(WireModel):
    input: str | list[InputItem] | None = None
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # --- extensions ---
    modality: Literal["text", "image"] | None = Field(
        default=None, description="infinity's dialect: with 'image', plain strings are images."
    )
    messages: list[ChatMessage] | None = Field(
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


class ClassifyRequest(WireModel):
    model: str | None = None
    input: str | list[InputItem] | None = None
    labels: list[str] = Field(description="class names; each becomes one classifier vector")
    prompt_templates: list[str] | Literal["imagenet"] | None = Field(
        default=None,
        description="strings containing '{}' (default: 'a photo of a {}.'), or 'imagenet' for open_clip's "
        "80 OpenAI ImageNet templates",
    )
    top_k: int | None = Field(default=None, ge=1)
    # --- extensions ---
    modality: Literal["text", "image"] | None = None
    messages: list[ChatMessage] | None = None


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
    documents: list[RerankItem]
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False


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


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    models: dict[str, PoolHealth]
