"""Turns parsed requests into responses through the two pools; no routing, no HTTP here (vLLM's `serving`).

`ClipService.embed` is the one path every route that needs vectors goes through.
"""

import asyncio
import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app import metrics
from serve_app.errors import InvalidRequest, ModelNotFound
from serve_app.inputs import ImageInput, Input, TextInput
from serve_app.modeling import ModelConfig
from serve_app.protocol import Embedding, EmbeddingResponse, ModelCard, ModelList, Usage


@dataclass(frozen=True)
class ServedModel:
    name: str
    config: ModelConfig
    encoder: Any  # DeploymentHandle of this model's ClipEncoder


@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # (N, D) float32, rows in input order, unit length
    prompt_tokens: int


class ClipService:
    def __init__(self, preprocessor: Any, models: dict[str, ServedModel]) -> None:
        self._preprocessor = preprocessor
        self._models = models
        self.default_model = next(iter(models))

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

    async def embed(self, model: ServedModel, inputs: list[Input]) -> Embedded:
        """Vectors of mixed text and image inputs, in input order; images and texts go in parallel."""
        images = [(i, x) for i, x in enumerate(inputs) if isinstance(x, ImageInput)]
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, TextInput)]
        groups = []  # (positions in the request, job)
        if images:
            groups.append(([i for i, _ in images], self._embed_images(model, [x for _, x in images])))
        if texts:
            groups.append(([i for i, _ in texts], self._embed_texts(model, [x for _, x in texts])))
        results = await asyncio.gather(*(job for _, job in groups))
        vectors = np.empty((len(inputs), model.config.embed_dim), dtype=np.float32)
        prompt_tokens = 0
        for (positions, _), (rows, tokens) in zip(groups, results):
            vectors[positions] = rows
            prompt_tokens += tokens
        metrics.count_inputs(model.name, "image", len(images))
        metrics.count_inputs(model.name, "text", len(texts))
        return Embedded(vectors=vectors, prompt_tokens=prompt_tokens)

    async def _embed_images(self, model: ServedModel, images: list[ImageInput]) -> tuple[np.ndarray, int]:
        pixels = self._preprocessor.images.remote(model.name, [x.data for x in images], [x.param for x in images])
        # Passing the response on lets the encoder fetch the pixels directly, not through this replica.
        return await model.encoder.embed_images.remote(pixels), 0

    async def _embed_texts(self, model: ServedModel, texts: list[TextInput]) -> tuple[np.ndarray, int]:
        batch = await self._preprocessor.texts.remote(model.name, [x.text for x in texts])
        return await model.encoder.embed_texts.remote(batch.tokens), sum(batch.token_counts)


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
