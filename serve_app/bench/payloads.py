"""What the load generator sends: request bodies built once, before the clock starts.

A payload kind turns a request index into one HTTP request (path, JSON body bytes, items it carries). Bodies
are pre-serialised so that the client's own CPU cost per request stays small on a 2-core machine, where the
client shares the cores with the server it measures. New kinds (another endpoint, another dialect) subclass
`PayloadKind`; `make_payload` builds the built-in ones from command-line options.
"""

import base64
import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

# Short captions, combined into distinct texts; 4-9 words each, like the queries of a search box.
_ADJECTIVES = ["red", "small", "old", "bright", "wooden", "striped", "empty", "wet", "golden", "broken", "quiet", "tall"]
_NOUNS = ["dog", "bicycle", "kitchen", "mountain", "teapot", "street", "sailboat", "cat", "bridge", "guitar", "forest", "train"]
_PLACES = ["on the beach", "at night", "in the snow", "next to a window", "in a city", "on a table", "under a tree", ""]


def synthetic_jpeg(width: int, height: int, seed: int, quality: int = 85) -> bytes:
    """A distinct photo-like JPEG: smooth colour fields, shapes and mild sensor noise.

    Pure noise would make a JPEG several times larger and slower to decode than a photograph of that size;
    this keeps the encoded size and decode cost in the range of real photos.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, max(11, width // 3))), y0 + int(rng.integers(10, max(11, height // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    base = base.filter(ImageFilter.GaussianBlur(1.5))
    pixels = np.asarray(base, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def short_texts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct short captions (distinct up to 1,152; a numbered suffix after that)."""
    combos = [(a, n, p) for a in _ADJECTIVES for n in _NOUNS for p in _PLACES]
    random.Random(seed).shuffle(combos)
    texts = []
    for i in range(count):
        a, n, p = combos[i % len(combos)]
        text = f"a photo of a {a} {n} {p}".strip()
        texts.append(text if i < len(combos) else f"{text} number {i // len(combos)}")
    return texts


def label_names(count: int) -> list[str]:
    """ImageNet's class names (shipped with open_clip) first, then numbered synthetic labels."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(IMAGENET_CLASSNAMES[:count])
    names += [f"object kind {i}" for i in range(len(names), count)]
    return names


@dataclass(frozen=True)
class HttpRequest:
    path: str
    body: bytes
    items: int  # inputs this request carries (images or texts), for items/s
    kind: str = "ok"  # "ok", or "invalid" for a deliberately bad request


@dataclass
class PayloadKind:
    """Builds a pool of distinct request bodies once; `request(i)` cycles through them."""

    model: str | None = None
    path: str = "/v1/embeddings"
    items_per_request: int = 1
    distinct: int = 64
    invalid_every: int = 0  # every n-th request carries a corrupt item (tests the error accounting)
    name: str = "custom"
    modality: str = "image"  # what one item is, for reporting
    _pool: list[HttpRequest] = field(default_factory=list, init=False, repr=False)

    def bodies(self) -> list[dict[str, Any]]:
        """Distinct JSON bodies; subclasses override."""
        raise NotImplementedError

    def invalid_body(self) -> dict[str, Any]:
        return {"model": self.model, "input": ["data:image/jpeg;base64,bm90IGFuIGltYWdl"], "modality": "image"}

    def prepare(self) -> "PayloadKind":
        if not self._pool:
            self._pool = [
                HttpRequest(self.path, json.dumps(body).encode(), self.items_per_request) for body in self.bodies()
            ]
        return self

    def request(self, index: int) -> HttpRequest:
        self.prepare()
        if self.invalid_every and (index + 1) % self.invalid_every == 0:
            return HttpRequest(self.path, json.dumps(self.invalid_body()).encode(), self.items_per_request, "invalid")
        return self._pool[index % len(self._pool)]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "path": self.path,
            "model": self.model,
            "modality": self.modality,
            "items_per_request": self.items_per_request,
            "distinct_bodies": self.distinct,
            "invalid_every": self.invalid_every,
        }


@dataclass
class ImagePayload(PayloadKind):
    """Distinct JPEGs of one size, as data URIs, with infinity's `"modality": "image"`."""

    width: int = 640
    height: int = 480
    quality: int = 85
    seed: int = 0
    name: str = "image"
    modality: str = "image"

    def images(self) -> list[str]:
        count = self.distinct * self.items_per_request
        return [jpeg_data_uri(synthetic_jpeg(self.width, self.height, self.seed + i, self.quality)) for i in range(count)]

    def bodies(self) -> list[dict[str, Any]]:
        uris = self.images()
        k = self.items_per_request
        return [
            {"model": self.model, "input": uris[i * k : (i + 1) * k], "modality": "image", "encoding_format": "float"}
            for i in range(self.distinct)
        ]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "width": self.width, "height": self.height, "jpeg_quality": self.quality}


@dataclass
class TextPayload(PayloadKind):
    """Distinct short captions."""

    seed: int = 0
    name: str = "text"
    modality: str = "text"

    def bodies(self) -> list[dict[str, Any]]:
        texts = short_texts(self.distinct * self.items_per_request, self.seed)
        k = self.items_per_request
        return [{"model": self.model, "input": texts[i * k : (i + 1) * k]} for i in range(self.distinct)]

    def invalid_body(self) -> dict[str, Any]:
        return {"model": self.model, "input": [""]}


@dataclass
class ClassifyPayload(ImagePayload):
    """Zero-shot `/v1/classify`: distinct images against one fixed label set (issue 3's request shape)."""

    path: str = "/v1/classify"
    labels: int = 1000
    templates: str | list[str] | None = "imagenet"
    name: str = "classify"

    def bodies(self) -> list[dict[str, Any]]:
        labels = label_names(self.labels)
        uris = self.images()
        k = self.items_per_request
        bodies = []
        for i in range(self.distinct):
            body: dict[str, Any] = {
                "model": self.model, "input": uris[i * k : (i + 1) * k], "labels": labels, "modality": "image",
            }
            if self.templates is not None:
                body["prompt_templates"] = self.templates
            bodies.append(body)
        return bodies

    def invalid_body(self) -> dict[str, Any]:
        return {"model": self.model, "input": [jpeg_data_uri(b"not an image")], "labels": ["a", "b"], "modality": "image"}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "labels": self.labels, "templates": self.templates}


PAYLOAD_KINDS = {"image": ImagePayload, "text": TextPayload, "classify": ClassifyPayload}


def make_payload(kind: str, **options: Any) -> PayloadKind:
    """A built-in payload kind; options that the kind does not take are ignored (one CLI for all kinds)."""
    try:
        cls = PAYLOAD_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown payload kind {kind!r}; choose from {sorted(PAYLOAD_KINDS)}") from None
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in options.items() if k in fields and fields[k].init and v is not None})
