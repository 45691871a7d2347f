"""open_clip glue: resolve a model id to its config, preprocessing, tokenizer and weights.

Preprocessing is data (open_clip's `PreprocessCfg`), read from the same place open_clip reads it, so the
CPU pool never needs the weights. Imports of torch and open_clip happen inside functions: importing
`serve_app` stays cheap.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from serve_app.config import ModelSpec

logger = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"  # `pretrained: random` builds a built-in architecture with random weights


@dataclass(frozen=True)
class ModelConfig:
    """What the preprocessing pool and the API need to know about a model, without its weights."""

    model_cfg: dict[str, Any]
    preprocess_cfg: dict[str, Any]

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def context_length(self) -> int:
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_model_config(model: str, pretrained: str | None = None) -> ModelConfig:
    """Reads the model and preprocess config the way `open_clip.create_model` does, minus the weights."""
    from open_clip.factory import get_model_config, parse_model_name
    from open_clip.pretrained import download_pretrained_from_hf, get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    from open_clip.utils import to_2tuple

    schema, identifier = parse_model_name(model)
    overlay: dict[str, Any] = {}
    if schema == "local-dir":
        path = Path(identifier) / "open_clip_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"local-dir model {identifier!r} has no open_clip_config.json")
        full = json.loads(path.read_text(encoding="utf-8"))
        model_cfg, overlay = full["model_cfg"], full.get("preprocess_cfg", {})
    elif schema == "hf-hub":
        path = download_pretrained_from_hf(identifier, filename="open_clip_config.json")
        full = json.loads(Path(path).read_text(encoding="utf-8"))
        model_cfg, overlay = full["model_cfg"], full.get("preprocess_cfg", {})
    else:
        name = identifier.replace("/", "-")
        model_cfg = get_model_config(name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {model!r}: not hf-hub:, local-dir: or a built-in name")
        if pretrained and pretrained != RANDOM_WEIGHTS:
            overlay = get_pretrained_cfg(name, pretrained) or {}
    preprocess_cfg = merge_preprocess_dict(PreprocessCfg(), overlay)
    # open_clip sets the size from the instantiated vision tower, i.e. from vision_cfg.image_size.
    preprocess_cfg["size"] = to_2tuple(model_cfg["vision_cfg"]["image_size"])
    return ModelConfig(model_cfg=model_cfg, preprocess_cfg=preprocess_cfg)


@dataclass(frozen=True)
class ImagePipeline:
    """open_clip's eval transform split in two: PIL geometry here (CPU pool), normalisation on the encoder.

    `to_pixels` ends with an RGB PIL image of the model's size; shipping its uint8 pixels is 4x smaller
    than floats. `MaybeToTensor` + `Normalize` (open_clip's last two steps) run on the encoder's device.
    """

    to_pixels: Callable[[Any], Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def image_pipeline(config: ModelConfig) -> ImagePipeline:
    from open_clip.transform import MaybeToTensor, PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose, Normalize

    transform = image_transform_v2(PreprocessCfg(**config.preprocess_cfg), is_train=False)
    *geometry, to_tensor, normalize = transform.transforms
    if not (isinstance(to_tensor, MaybeToTensor) and isinstance(normalize, Normalize)):
        raise RuntimeError(f"unexpected open_clip eval transform {transform}; cannot split off normalisation")
    return ImagePipeline(Compose(geometry), tuple(normalize.mean), tuple(normalize.std))


def get_tokenizer(model: str) -> Callable[..., "torch.Tensor"]:
    """open_clip's tokenizer for `model`, with bounded work and memory per text (serve_app/tokenizing.py)."""
    import open_clip

    from serve_app.tokenizing import BoundedTokenizer

    return BoundedTokenizer(open_clip.get_tokenizer(model))


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was configured but no CUDA device is visible to this replica")
    return requested


def resolve_precision(requested: str, device: str) -> str:
    if requested == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return requested


def load_model(spec: "ModelSpec", device: str, precision: str) -> "torch.nn.Module":
    """Loads weights through open_clip; a model whose weights cannot be loaded fails, never runs random."""
    import open_clip

    random_weights = spec.pretrained == RANDOM_WEIGHTS
    model = open_clip.create_model(
        spec.model,
        pretrained=None if random_weights else spec.pretrained,
        precision=precision,
        device=device,
        require_pretrained=not random_weights,
    )
    if random_weights:
        logger.warning("serving %s with RANDOM weights (pretrained=random): for benchmarks only", spec.model)
    return model.eval()


def can_trim_text(model: "torch.nn.Module") -> bool:
    """True when cutting padding off the token tensor leaves the text embedding unchanged.

    That holds for open_clip's own text tower with a causal mask, pooling at the end-of-text (argmax/eos)
    or first token: padding after the last real token can never be attended to or pooled.
    """
    import open_clip

    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos", "first")
    )


def encode_text(model: "torch.nn.Module", tokens: "torch.Tensor") -> "torch.Tensor":
    """`model.encode_text(tokens, normalize=True)`, running only up to the longest real sequence.

    `CLIP.encode_text` always runs all context positions (77); a short caption then costs 5x more
    than it needs. Same open_clip modules, same order; pinned against `encode_text` by a parity test.
    """
    import torch
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    if not can_trim_text(model):
        return model.encode_text(tokens, normalize=True)
    used = (tokens != 0).any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        is_linear = isinstance(model.text_projection, torch.nn.Linear)
        x = model.text_projection(x) if is_linear else x @ model.text_projection
    return F.normalize(x, dim=-1)


def prefetch(model: str, pretrained: str | None = None) -> str:
    """Downloads config and weights into the local cache before serving; returns the weights' path.

    `make serve` calls this first so that a machine without hub access fails in seconds with a clear
    message, instead of replicas retrying a download.
    """
    from open_clip.factory import parse_model_name
    from open_clip.pretrained import download_pretrained, download_pretrained_from_hf, get_pretrained_cfg

    load_model_config(model, pretrained)
    schema, identifier = parse_model_name(model)
    if schema == "hf-hub":
        return download_pretrained_from_hf(identifier)
    if schema == "local-dir":
        return identifier
    if not pretrained or pretrained == RANDOM_WEIGHTS:
        return "(random weights)"
    cfg = get_pretrained_cfg(identifier.replace("/", "-"), pretrained)
    if not cfg:
        raise ValueError(f"unknown pretrained tag {pretrained!r} for {model!r}")
    return download_pretrained(cfg)


def main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Fetch a model's config and weights into the local cache.")
    parser.add_argument("model")
    parser.add_argument("--pretrained")
    args = parser.parse_args()
    try:
        print(prefetch(args.model, args.pretrained))
    except Exception as exc:  # a message for a person, not a traceback
        print(f"cannot fetch {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
