"""EXPERIMENT, not the service: proposal (a) of BENCHMARKS.md on top of the service as it is (its gated encoder).

Text requests are tokenized in the ingress (open_clip's tokenizer needs no weights and costs microseconds per
text), so a text request makes one handle call (ingress → encoder) instead of two (ingress → preprocessor →
ingress → encoder). Images still go through the preprocessing pool.

    clip-bench compare --systems ours --import-path serve_app.bench.experiments.ingress_tokens:build_app
"""

from typing import Any

import numpy as np

from serve_app.bench.experiments import build_app_with
from serve_app.ingress import OpenAIIngress as _IngressDeployment
from serve_app.modeling import get_tokenizer
from serve_app.serving import ClipService

_IngressBase: Any = _IngressDeployment.func_or_class


class LocalTokenService(ClipService):
    tokenizers: dict[str, Any]

    async def _embed_texts(self, model: Any, texts: list[Any]) -> tuple[np.ndarray, int]:
        tokens = self.tokenizers[model.name]([x.text for x in texts])
        return await model.encoder.embed_texts.remote(tokens), int((tokens != 0).sum())


class LocalTokenIngress(_IngressBase):
    async def __init__(self, *args: Any, **kwargs: Any) -> None:  # Serve's ingress wrapper has an async __init__
        await super().__init__(*args, **kwargs)
        models = kwargs.get("models", args[2] if len(args) > 2 else None)
        self._service.__class__ = LocalTokenService
        self._service.tokenizers = {spec.name: get_tokenizer(spec.model) for spec in models}


def build_app(args: Any) -> Any:
    """The service's own `build_app` with `LocalTokenIngress` as the ingress (runs 4-5 measured it on the
    drain-batching experiment instead, before the service had its batching gate)."""
    return build_app_with(args, "OpenAIIngress", LocalTokenIngress)
