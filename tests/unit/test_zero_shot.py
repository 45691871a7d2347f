"""Zero-shot arithmetic pinned against open_clip, prompt templates, and the label cache (no Ray)."""

import io

import numpy as np
import open_clip
import pytest
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image

from serve_app.errors import InvalidRequest
from serve_app.zero_shot import LabelCache, classifier_vectors, prompts, resolve_templates, zero_shot_scores
from tests.conftest import encode, random_image

IMAGES = [encode(random_image(90, 70, seed=s), "JPEG", quality=95) for s in (31, 32, 33)]
LABELS = ["cat", "dog", "car", "tree", "a {weird} label"]


def open_clip_scores(reference, images: list[bytes], labels: list[str], templates) -> np.ndarray:
    """open_clip's own zero-shot: build_zero_shot_classifier + softmax(logit_scale.exp() * image @ W)."""
    model, preprocess, tokenizer = reference
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(model, tokenizer, labels, templates, num_classes_per_batch=2)
        pixels = torch.stack([preprocess(Image.open(io.BytesIO(raw))) for raw in images])
        features = model.encode_image(pixels, normalize=True)
        return (model.logit_scale.exp() * features @ weights).softmax(dim=-1).numpy()


# ------------------------------------------------------------------ units


def test_templates_default_imagenet_and_validation():
    assert resolve_templates(None, 10) == ("a photo of a {}.",)
    imagenet = resolve_templates("imagenet", 10)
    assert len(imagenet) == 80 and imagenet[0] == OPENAI_IMAGENET_TEMPLATES[0]("{}")
    for bad, param in ((["no placeholder"], "prompt_templates[0]"), (["{} and {0}"], "prompt_templates[0]"),
                       ([], "prompt_templates"), (["{}"] * 11, "prompt_templates"), ("nope", "prompt_templates")):
        with pytest.raises(InvalidRequest) as info:
            resolve_templates(bad, 10)
        assert info.value.param == param


def test_math_equals_open_clip_classifier(reference):
    model, _, tokenizer = reference
    templates = ("a photo of a {}.", "a drawing of a {}.", "{}")
    with torch.no_grad():
        expected = open_clip.build_zero_shot_classifier(model, tokenizer, LABELS, templates).T.numpy()
        prompt_vectors = model.encode_text(tokenizer(prompts(LABELS, templates)), normalize=True).numpy()
    np.testing.assert_allclose(classifier_vectors(prompt_vectors, len(LABELS)), expected, atol=1e-6)
    scores = zero_shot_scores(np.eye(expected.shape[1], dtype=np.float32)[:2], expected, 2.0)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0)


def test_label_cache_is_a_bounded_lru_counting_hits_and_misses():
    cache = LabelCache(capacity=2)
    templates = ("{}",)
    cache.put_many("m", templates, {"a": np.ones(2), "b": np.zeros(2)})
    assert set(cache.get_many("m", templates, ["a", "x"])) == {"a"}  # touches a
    cache.put_many("m", templates, {"c": np.ones(2)})  # evicts b, the least recently used
    assert set(cache.get_many("m", templates, ["a", "b", "c"])) == {"a", "c"}
    assert cache.get_many("other-model", templates, ["a"]) == {}
    assert cache.get_many("m", ("x {}",), ["a"]) == {}
    assert (cache.hits, cache.misses) == (3, 4) and len(cache) == 2


