"""Turns parsed requests into responses through the two pools; no routing, no HTTP here (vLLM's `serving`).

`ClipService.embed` is the one path every route that needs vectors goes through.
"""

import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app import metrics
from serve_app.coalescing import Coalescer
from serve_app.config import BatchSettings, ZeroShotSettings
from serve_app.errors import InvalidRequest, ModelNotFound, Overloaded, PoolUnavailable, pool_refusal
from serve_app.inputs import ImageInput, Input, TextInput
from serve_app.modeling import ModelConfig
from serve_app.openmp import keep_torch_serial_on_this_thread
from serve_app.preprocess import all_or_nothing, tokenize
from serve_app.tenancy import gate as tenancy_gate
from serve_app.tokenizing import cheap_to_tokenize
from serve_app.protocol import (
    Classification,
    ClassifyResponse,
    Embedding,
    EmbeddingResponse,
    LabelScore,
    ModelCard,
    ModelList,
    RerankResponse,
    RerankResult,
    Usage,
)
from serve_app.zero_shot import LabelCache, classifier_vectors, prompts, zero_shot_scores

# Inputs per call to the pools: big requests (a 80,000-prompt label set) are cut so that the pieces
# pipeline through preprocessing and spread over encoder replicas.
CHUNK = 1024


@dataclass(frozen=True)
class ServedModel:
    name: str
    config: ModelConfig
    encoder: Any  # DeploymentHandle of this model's ClipEncoder
    tokenizer: Any = None  # the model's bounded tokenizer, for texts tokenized at the ingress
    batching: BatchSettings | None = None  # the model's batching (its ModelSpec's); None: the defaults


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (N, D) float32, rows in input order, unit length
    prompt_tokens: int


class ClipService:
    def __init__(
        self, preprocessor: Any, models: dict[str, ServedModel], zero_shot: ZeroShotSettings | None = None
    ) -> None:
        self._preprocessor = preprocessor
        self._models = models
        self.default_model = next(iter(models))
        self.zero_shot = zero_shot or ZeroShotSettings()
        self.label_cache = LabelCache(self.zero_shot.label_cache_size)
        self._logit_scales: dict[str, float] = {}
        self._pending: dict[tuple[str, str, tuple[str, ...], str], asyncio.Future] = {}
        # Concurrent requests' token rows for one model reach its encoder in fewer calls (serve_app/coalescing.py).
        self._texts = {name: _text_coalescer(model) for name, model in models.items()}

    def model(self, name: str | None) -> ServedModel:
        """The model a request names; omitted means the first configured one."""
        if name is None:
            return self._models[self.default_model]
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(
                f"The model `{name}` does not exist. Served models: {', '.join(self._models)}", param="model"
            ) from None

    def model_list(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=m.name,
                    embedding_dimensions=m.config.embed_dim,
                    context_length=m.config.context_length,
                    image_size=list(m.config.image_size),
                )
                for m in self._models.values()
            ]
        )

    @property
    def models(self) -> dict[str, ServedModel]:
        return self._models

    async def embed(self, model: ServedModel, inputs: list[Input], image_share: float = 1.0) -> Embedded:
        """Vectors of mixed text and image inputs, in input order; images and texts go in parallel.
        `image_share`: this part's share of the request's images (and so of its image budgets)."""
        if len(inputs) > CHUNK:
            chunks = [inputs[i : i + CHUNK] for i in range(0, len(inputs), CHUNK)]
            total = sum(isinstance(x, ImageInput) for x in inputs) or 1
            parts = await all_or_nothing(
                [self.embed(model, c, sum(isinstance(x, ImageInput) for x in c) / total) for c in chunks]
            )
            return Embedded(
                vectors=np.concatenate([p.vectors for p in parts]),
                prompt_tokens=sum(p.prompt_tokens for p in parts),
            )
        images = [(i, x) for i, x in enumerate(inputs) if isinstance(x, ImageInput)]
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, TextInput)]
        groups = []  # (positions in the request, job)
        if images:
            groups.append(([i for i, _ in images], _used(model, self._embed_images(
                model, [x for _, x in images], image_share), len(images))))
        if texts:
            groups.append(([i for i, _ in texts], _used(model, self._embed_texts(model, [x for _, x in texts]), 0)))
        # a failure cancels the rest (what is not yet encoded is not encoded); what was done is billed (_used)
        results = await all_or_nothing([job for _, job in groups])
        vectors = np.empty((len(inputs), model.config.embed_dim), dtype=np.float32)
        prompt_tokens = 0
        for (positions, _), (rows, tokens) in zip(groups, results):
            vectors[positions] = rows
            prompt_tokens += tokens
        metrics.count_inputs(model.name, "image", len(images))
        metrics.count_inputs(model.name, "text", len(texts))
        return Embedded(vectors=vectors, prompt_tokens=prompt_tokens)

    async def _embed_images(
        self, model: ServedModel, images: list[ImageInput], share: float = 1.0
    ) -> tuple[np.ndarray, int]:
        pixels = self._preprocessor.images.remote(
            model.name, [x.data for x in images], [x.param for x in images], share
        )
        # Passing the response on lets the encoder fetch the pixels directly, not through this replica.
        return await _from_pool(model.encoder.embed_images.remote(pixels)), 0

    async def _embed_texts(self, model: ServedModel, texts: list[TextInput]) -> tuple[np.ndarray, int]:
        """Short texts (`cheap_to_tokenize`: a few milliseconds at most) are tokenized here, on the event loop
        (tens of microseconds a caption), and reach the encoder in one call; longer ones go through the
        preprocessing pool, whose threads keep their cleaning off this loop."""
        strings = [x.text for x in texts]
        if model.tokenizer is not None and cheap_to_tokenize(strings):
            keep_torch_serial_on_this_thread()
            start = time.perf_counter()
            batch = tokenize(model.tokenizer, strings)
            metrics.observe_preprocess("text", time.perf_counter() - start)
        else:
            batch = await _from_pool(self._preprocessor.texts.remote(model.name, strings))
        return await self._texts[model.name](batch.tokens), sum(batch.token_counts)

    def uncached_labels(self, model: ServedModel, labels: list[str], templates: tuple[str, ...]) -> list[str]:
        """The distinct labels whose classifier vectors are not in the label cache (what a request would encode)."""
        return self.label_cache.missing(model.name, templates, labels, _label_namespace())

    async def classifiers(
        self, model: ServedModel, labels: list[str], templates: tuple[str, ...]
    ) -> tuple[np.ndarray, int]:
        """(labels, D) classifier vectors, from the label cache where possible; returns text tokens spent.
        The labels were checked by the route (count, emptiness, length) before any work.

        Labels already being encoded for a concurrent request are awaited, not encoded again: a burst of
        requests with one new 80,000-prompt label set encodes it once.
        """
        namespace = _label_namespace()
        vectors = self.label_cache.get_many(model.name, templates, labels, namespace)
        missing = [label for label in dict.fromkeys(labels) if label not in vectors]
        keys = {label: (model.name, namespace, templates, label) for label in missing}
        waiting = {label: self._pending[keys[label]] for label in missing if keys[label] in self._pending}
        mine = [label for label in missing if label not in waiting]
        tokens = await self._encode_labels(model, mine, templates, keys, vectors) if mine else 0
        for label, future in waiting.items():
            try:
                vectors[label] = await asyncio.shield(future)
            except Exception:  # the request that was encoding it failed: encode it here
                tokens += await self._encode_labels(model, [label], templates, keys, vectors)
        return np.stack([vectors[label] for label in labels]), tokens

    async def _encode_labels(
        self, model: ServedModel, labels: list[str], templates: tuple[str, ...],
        keys: dict[str, tuple[str, str, tuple[str, ...], str]], into: dict[str, np.ndarray],
    ) -> int:
        loop = asyncio.get_running_loop()
        futures = {label: loop.create_future() for label in labels}
        for label, future in futures.items():
            self._pending[keys[label]] = future
        try:
            inputs = await off_loop(len(labels) * len(templates), _prompt_inputs, labels, templates)
            embedded = await self.embed(model, inputs)
            fresh = dict(zip(labels, classifier_vectors(embedded.vectors, len(labels))))
            self.label_cache.put_many(model.name, templates, fresh, _label_namespace())
            into.update(fresh)
            for label, future in futures.items():
                future.set_result(fresh[label])
            return embedded.prompt_tokens
        except BaseException as exc:
            for future in futures.values():
                future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
                future.exception()  # marks it retrieved: no warning when nobody was waiting
            raise
        finally:
            for label in labels:
                self._pending.pop(keys[label], None)

    async def logit_scale(self, model: ServedModel) -> float:
        if model.name not in self._logit_scales:
            self._logit_scales[model.name] = await _from_pool(model.encoder.logit_scale.remote())
        return self._logit_scales[model.name]

    async def classify(
        self, model: ServedModel, inputs: list[Input], labels: list[str], templates: tuple[str, ...],
        top_k: int | None,
    ) -> ClassifyResponse:
        (classifiers, label_tokens), embedded, scale = await all_or_nothing(
            [self.classifiers(model, labels, templates), self.embed(model, inputs), self.logit_scale(model)]
        )
        return await off_loop(
            len(inputs) * min(top_k or len(labels), len(labels)),
            classification_response, model, embedded, label_tokens, classifiers, scale, labels, top_k,
        )

    async def rerank(
        self, model: ServedModel, query: Input, documents: list[Input], originals: list[Any], top_n: int | None,
        return_documents: bool,
    ) -> RerankResponse:
        """Documents by cosine similarity to the query, highest first; text and images in any mix."""
        embedded = await self.embed(model, [query, *documents])
        scores = embedded.vectors[1:] @ embedded.vectors[0]
        order = np.argsort(-scores, kind="stable")[: top_n or len(documents)]
        results = [
            RerankResult(
                index=int(i), relevance_score=float(scores[i]), document=originals[i] if return_documents else None
            )
            for i in order
        ]
        usage = Usage(prompt_tokens=embedded.prompt_tokens, total_tokens=embedded.prompt_tokens)
        return RerankResponse(model=model.name, results=results, usage=usage)


def _text_coalescer(model: ServedModel) -> Coalescer:
    batching = model.batching or BatchSettings()

    async def send(tokens: Any) -> np.ndarray:
        return await _from_pool(model.encoder.embed_texts.remote(tokens))

    # A refusal by the pool (`_from_pool`) says nothing about any request's rows: no retry one by one.
    return Coalescer(send, batching.ingress_calls_in_flight, batching.text_max_batch_size,
                     shared_failure=lambda exc: isinstance(exc, (Overloaded, PoolUnavailable)))


def _label_namespace() -> str:
    """The label cache's share of the request's key (none without tenancy)."""
    tenant = tenancy_gate.CURRENT.get()
    return tenant.key.id if tenant is not None else ""


async def _used(model: ServedModel, job: Any, images: int) -> tuple[np.ndarray, int]:
    """`job`'s rows and tokens, reported to the request's key as soon as the encoder has done them."""
    rows, tokens = await job
    tenancy_gate.used(model.name, tokens, images)
    return rows, tokens


async def _from_pool(response: Any) -> Any:
    """The answer of a call to another pool; a refusal by Ray (queue full, no replica) becomes our own error."""
    try:
        return await response
    except Exception as exc:
        refusal = pool_refusal(exc)
        if refusal is None:
            raise
        raise refusal from exc


# Responses with more values than this are built and serialised in a thread: the event loop answers other
# requests meanwhile (a 2,048-row embedding of 1,024 floats takes a few hundred milliseconds to write).
INLINE_RESPONSE_VALUES = 16_384


async def off_loop(values: int, build: Any, *args: Any) -> Any:
    """`build(*args)` on the event loop when the response holds few `values`, else in a worker thread."""
    if values <= INLINE_RESPONSE_VALUES:
        return build(*args)
    return await asyncio.to_thread(build, *args)


def _prompt_inputs(labels: list[str], templates: tuple[str, ...]) -> list[Input]:
    return [TextInput(t, "labels") for t in prompts(labels, templates)]


def classification_response(
    model: ServedModel, embedded: Embedded, label_tokens: int, classifiers: np.ndarray, scale: float,
    labels: list[str], top_k: int | None,
) -> ClassifyResponse:
    scores = zero_shot_scores(embedded.vectors, classifiers, scale)
    keep = min(top_k or len(labels), len(labels))
    data = []
    for i, row in enumerate(scores):
        order = np.argsort(-row, kind="stable")[:keep]
        predictions = [LabelScore(label=labels[j], score=float(row[j])) for j in order]
        data.append(Classification(index=i, prediction=predictions[0].label, score=predictions[0].score,
                                   predictions=predictions))
    tokens = embedded.prompt_tokens + label_tokens
    return ClassifyResponse(model=model.name, data=data, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


def check_dimensions(model: ServedModel, dimensions: int | None) -> None:
    if dimensions is not None and dimensions != model.config.embed_dim:
        raise InvalidRequest(
            f"`dimensions` must equal this model's embedding size {model.config.embed_dim} "
            f"(CLIP embeddings cannot be shortened), got {dimensions}",
            param="dimensions",
        )


def embedding_response(
    model: ServedModel, embedded: Embedded, encoding_format: str
) -> EmbeddingResponse:
    if encoding_format == "base64":
        little_endian = embedded.vectors.astype("<f4", copy=False)
        values: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    else:
        values = embedded.vectors.tolist()
    data = [Embedding.model_construct(object="embedding", index=i, embedding=v) for i, v in enumerate(values)]
    usage = Usage(prompt_tokens=embedded.prompt_tokens, total_tokens=embedded.prompt_tokens)
    return EmbeddingResponse(model=model.name, data=data, usage=usage)
