"""Zero-shot classification as open_clip evaluates it, and the cache of classifier vectors.

A label's classifier vector is the L2-normalised mean of the unit text embeddings of its prompts
(`open_clip.build_zero_shot_classifier`); scores are `softmax(logit_scale.exp() * image @ classifiers)`.
Label sets repeat (a catalogue, ImageNet's 1,000 classes x 80 templates), so classifier vectors are cached
per (model, templates, label) in a bounded LRU at the ingress: a repeated label set costs no text
encoding and no trip to the pools at all.
"""

import hashlib
import string
from collections import OrderedDict
from threading import Lock

import numpy as np

from serve_app import metrics
from serve_app.errors import InvalidRequest
from serve_app.inputs import check_count

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def resolve_templates(
    templates: list[str] | str | None, max_templates: int, max_template_chars: int = 256
) -> tuple[str, ...]:
    """Templates as format strings; 'imagenet' means open_clip's 80 OpenAI ImageNet templates.

    Each must hold exactly one bare `{}` (no field name, conversion or format spec): `str.format` runs on
    every prompt, and a spec such as `{:>2000000000}` would allocate gigabytes on the event loop.
    """
    if templates is None:
        return DEFAULT_TEMPLATES
    if templates == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    if isinstance(templates, str):
        raise InvalidRequest("`prompt_templates` must be a list of strings or 'imagenet'", param="prompt_templates")
    if not templates:
        raise InvalidRequest("`prompt_templates` must not be empty", param="prompt_templates")
    if len(templates) > max_templates:
        raise InvalidRequest(
            f"`prompt_templates` has {len(templates)} templates; the limit is {max_templates}",
            param="prompt_templates",
        )
    for i, template in enumerate(templates):
        check_template(template, f"prompt_templates[{i}]", max_template_chars)
    return tuple(templates)


def check_template(template: str, param: str, max_chars: int) -> None:
    """Exactly one bare `{}` field; other braces doubled (`{{`, `}}`); at most `max_chars` characters."""
    if len(template) > max_chars:
        raise InvalidRequest(
            f"template has {len(template)} characters; the limit is {max_chars}", param=param
        )
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError:  # a single '{' or '}'
        fields = None
    if fields != [("", "", None)]:
        raise InvalidRequest(
            f"template {template[:80]!r} must contain exactly one bare placeholder '{{}}' (no field name, "
            "conversion or format spec; write other braces as '{{' and '}}')",
            param=param,
        )


def check_prompt_count(labels: int, templates: int, max_prompts: int) -> None:
    """labels x templates prompts are encoded for one request: bounded before any is built."""
    if labels * templates > max_prompts:
        raise InvalidRequest(
            f"{labels} labels x {templates} templates = {labels * templates} prompts; the limit is {max_prompts}",
            param="labels",
        )


def prompt_chars(labels: list[str], templates: tuple[str, ...]) -> int:
    """Characters of all prompts together, computed without building them: every label appears in every
    template, and every template (less its `{}`) once per label."""
    return len(templates) * sum(map(len, labels)) + len(labels) * sum(len(t) - 2 for t in templates)


def check_prompt_chars(labels: list[str], templates: tuple[str, ...], max_chars: int) -> None:
    """What tokenizing a request's prompts costs grows with their characters, not their count: bounded
    before any prompt is built (ImageNet's 80,000 prompts are about 3 million characters)."""
    total = prompt_chars(labels, templates)
    if total > max_chars:
        raise InvalidRequest(
            f"{len(labels)} labels x {len(templates)} templates make prompts of {total} characters together; "
            f"the limit is {max_chars}",
            param="labels",
        )


def prompt_lines(labels: list[str], templates: tuple[str, ...]) -> int:
    """Line breaks of all prompts together (each prompt is cleaned on its own), computed without building them."""
    return len(templates) * sum(label.count("\n") for label in labels) + len(labels) * sum(
        template.count("\n") for template in templates)


def check_scores(inputs: int, labels: int, top_k: int | None, max_scores: int) -> None:
    """A response carries inputs x (top_k or all labels) scores: bounded before any is computed."""
    kept = min(top_k or labels, labels)
    if inputs * kept > max_scores:
        raise InvalidRequest(
            f"{inputs} inputs x {kept} scores each = {inputs * kept} scores in the response; the limit is "
            f"{max_scores}: set `top_k`, or send fewer inputs per request",
            param="top_k",
        )


def check_labels(labels: list[str], max_labels: int, max_chars: int | None = None) -> None:
    check_count(len(labels), max_labels, "labels")
    for i, label in enumerate(labels):
        if not label.strip():
            raise InvalidRequest("labels must not be empty", param=f"labels[{i}]")
        if max_chars is not None and len(label) > max_chars:
            raise InvalidRequest(f"label has {len(label)} characters; the limit is {max_chars}", param=f"labels[{i}]")


def prompts(labels: list[str], templates: tuple[str, ...]) -> list[str]:
    """Label-major, as open_clip builds them: every template of label 0, then of label 1, ..."""
    return [template.format(label) for label in labels for template in templates]


def classifier_vectors(prompt_vectors: np.ndarray, num_labels: int) -> np.ndarray:
    """(labels*templates, D) unit prompt vectors -> (labels, D) unit classifier vectors."""
    means = prompt_vectors.reshape(num_labels, -1, prompt_vectors.shape[-1]).mean(axis=1)
    return means / np.linalg.norm(means, axis=1, keepdims=True)


def zero_shot_scores(image_vectors: np.ndarray, classifiers: np.ndarray, logit_scale: float) -> np.ndarray:
    """softmax(logit_scale.exp() * images @ classifiers.T), rows summing to 1."""
    logits = np.exp(logit_scale) * (image_vectors.astype(np.float64) @ classifiers.astype(np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.exp(logits)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def _digest(*parts: object) -> bytes:
    """16 bytes for a cache key: a key that held the label and templates themselves would let 20,000 labels of
    16,000 characters hold over a gigabyte."""
    return hashlib.blake2b(repr(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class LabelCache:
    """Bounded LRU of classifier vectors keyed by a digest of (model, templates, namespace, label); counts hits and
    misses. The namespace is the request's key id: what one customer's labels cost (and so whether anyone sent
    them before) is never visible to another; one LRU bounds them all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = Lock()
        self.hits = 0
        self.misses = 0

    def missing(self, model: str, templates: tuple[str, ...], labels: list[str], namespace: str = "") -> list[str]:
        """The distinct labels not cached, without counting a lookup or touching their recency."""
        with self._lock:
            prefix = _digest(model, templates, namespace)
            return [label for label in dict.fromkeys(labels) if _digest(prefix, label) not in self._entries]

    def get_many(self, model: str, templates: tuple[str, ...], labels: list[str],
                 namespace: str = "") -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            prefix = _digest(model, templates, namespace)
            for label in labels:
                key = _digest(prefix, label)
                vector = self._entries.get(key)
                if vector is not None:
                    self._entries.move_to_end(key)
                    found[label] = vector
        unique = len(set(labels))
        self.hits += len(found)
        self.misses += unique - len(found)
        metrics.count_label_cache(model, hits=len(found), misses=unique - len(found))
        return found

    def put_many(self, model: str, templates: tuple[str, ...], vectors: dict[str, np.ndarray],
                 namespace: str = "") -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            prefix = _digest(model, templates, namespace)
            for label, vector in vectors.items():
                key = _digest(prefix, label)
                self._entries[key] = vector
                self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
