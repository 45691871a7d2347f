"""Zero-shot /v1/classify and cross-modal /v1/rerank over HTTP, pinned against open_clip; two models."""

import numpy as np
import open_clip
import pytest
import requests

from serve_app.protocol import ClassifyResponse, RerankResponse
from serve_app.zero_shot import prompts, resolve_templates
from tests.conftest import SECOND_NAME, TINY_NAME, b64, data_uri
from tests.integration.test_api import assert_error, expected_image, expected_text, post, vectors
from tests.unit.test_zero_shot import IMAGES, LABELS, open_clip_scores

# ------------------------------------------------------------------ /v1/classify over HTTP


def classify(url: str, body: dict) -> ClassifyResponse:
    response = post(url, body, path="/v1/classify")
    assert response.status_code == 200, response.text
    return ClassifyResponse.model_validate_json(response.text)


@pytest.mark.parametrize("templates", [None, ["a photo of a {}.", "itap of a {}.", "{}"], "imagenet"])
def test_classify_scores_equal_open_clip(serve_url, reference, templates):
    body = {"model": TINY_NAME, "input": [{"image": b64(raw)} for raw in IMAGES], "labels": LABELS}
    if templates is not None:
        body["prompt_templates"] = templates
    result = classify(serve_url, body)
    expected_templates = resolve_templates(templates, 100)
    expected = open_clip_scores(reference, IMAGES, LABELS, expected_templates)
    assert [c.index for c in result.data] == [0, 1, 2]
    for item, want in zip(result.data, expected):
        got = {p.label: p.score for p in item.predictions}
        np.testing.assert_allclose([got[label] for label in LABELS], want, atol=1e-4)
        assert [p.score for p in item.predictions] == sorted(got.values(), reverse=True)
        assert item.prediction == LABELS[int(np.argmax(want))] and item.score == item.predictions[0].score


def test_classify_top_k_text_inputs_and_default_model(serve_url, reference):
    result = classify(serve_url, {"input": ["a kitten", {"image": data_uri(IMAGES[0])}], "labels": LABELS, "top_k": 2})
    assert result.model == TINY_NAME and len(result.data) == 2
    assert all(len(item.predictions) == 2 for item in result.data)


def test_repeated_label_set_is_served_from_the_cache(serve_url):
    labels = [f"catalogue item {i}" for i in range(20)]
    body = {"model": TINY_NAME, "input": [{"image": b64(IMAGES[1])}], "labels": labels,
            "prompt_templates": ["a photo of {}.", "a product shot of {}."]}
    first = classify(serve_url, body)
    second = classify(serve_url, body)
    assert first.usage.prompt_tokens > 0  # 40 prompts were encoded
    assert second.usage.prompt_tokens == 0  # no text encoded at all: every classifier came from the cache
    assert [p.model_dump() for p in first.data[0].predictions] == [p.model_dump() for p in second.data[0].predictions]
    # a different template set is a different classifier
    third = classify(serve_url, {**body, "prompt_templates": ["{}"]})
    assert third.usage.prompt_tokens > 0


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": ["x"], "labels": []}, 400, "labels"),
        ({"input": ["x"], "labels": ["a"] * 51}, 400, "labels"),
        ({"input": ["x"], "labels": ["a", " "]}, 400, "labels[1]"),
        ({"input": ["x"], "labels": ["a"], "prompt_templates": ["no slot"]}, 400, "prompt_templates[0]"),
        ({"input": ["x"], "labels": ["a"], "prompt_templates": "cifar"}, 400, "prompt_templates"),
        ({"input": [{"image": "bad!"}], "labels": ["a"]}, 400, "input[0]"),
        ({"input": [], "labels": ["a"]}, 400, "input"),
        ({"input": ["x"]}, 400, "labels"),
        ({"input": ["x"], "labels": ["a"], "top_k": 0}, 400, "top_k"),
        ({"input": ["x"], "labels": ["a"], "model": "nope"}, 404, "model"),
    ],
)
def test_classify_errors(serve_url, body, status, param):
    assert_error(post(serve_url, body, path="/v1/classify"), status, param)


# ------------------------------------------------------------------ /v1/rerank over HTTP


def rerank(url: str, body: dict) -> RerankResponse:
    response = post(url, body, path="/v1/rerank")
    assert response.status_code == 200, response.text
    return RerankResponse.model_validate_json(response.text)


def test_text_query_over_images(serve_url, reference):
    documents = [{"image": b64(raw)} for raw in IMAGES]
    result = rerank(serve_url, {"model": TINY_NAME, "query": "a red car", "documents": documents})
    query = expected_text(reference, "a red car")
    expected = [float(expected_image(reference, raw) @ query) for raw in IMAGES]
    assert [r.index for r in result.results] == list(np.argsort(expected)[::-1])
    for r in result.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-4)
        assert r.document is None


def test_image_query_over_texts_top_n_and_documents_returned(serve_url, reference):
    texts = ["a cat", "a dog", "a car", "a tree"]
    body = {"query": {"type": "image_url", "image_url": {"url": data_uri(IMAGES[2])}}, "documents": texts,
            "top_n": 2, "return_documents": True}
    result = rerank(serve_url, body)
    image = expected_image(reference, IMAGES[2])
    expected = [float(expected_text(reference, t) @ image) for t in texts]
    best = list(np.argsort(expected)[::-1][:2])
    assert [r.index for r in result.results] == best
    assert [r.document for r in result.results] == [texts[i] for i in best]
    raw = requests.post(serve_url + "/v1/rerank", json={**body, "return_documents": False}, timeout=30).json()
    assert "document" not in raw["results"][0]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": ["d"] * 65}, "documents"),
        ({"query": {"image": "http://x/y.jpg"}, "documents": ["d"]}, "query"),
        ({"query": "q", "documents": ["d", {"image": "!!"}]}, "documents[1]"),
        ({"documents": ["d"]}, "query"),
    ],
)
def test_rerank_errors(serve_url, body, param):
    assert_error(post(serve_url, body, path="/v1/rerank"), 400, param)


# ------------------------------------------------------------------ several models in one app


def test_each_model_answers_with_its_own_vectors(serve_url, reference, second_reference):
    body = {"input": ["a boat", {"image": b64(IMAGES[0])}]}
    first = vectors(post(serve_url, {**body, "model": TINY_NAME}))
    second = vectors(post(serve_url, {**body, "model": SECOND_NAME}))
    assert first.shape == (2, 32) and second.shape == (2, 24)
    for got, ref in ((first, reference), (second, second_reference)):
        np.testing.assert_allclose(got[0], expected_text(ref, "a boat"), atol=1e-5)
        np.testing.assert_allclose(got[1], expected_image(ref, IMAGES[0]), atol=1e-5)


def test_second_model_classifies_like_open_clip(serve_url, second_reference):
    result = classify(serve_url, {"model": SECOND_NAME, "input": [{"image": b64(IMAGES[1])}], "labels": LABELS})
    expected = open_clip_scores(second_reference, IMAGES[1:2], LABELS, ("a photo of a {}.",))[0]
    got = {p.label: p.score for p in result.data[0].predictions}
    np.testing.assert_allclose([got[label] for label in LABELS], expected, atol=1e-4)


def test_a_burst_with_one_new_label_set_encodes_it_once(serve_url):
    from concurrent.futures import ThreadPoolExecutor

    labels = [f"burst label {i}" for i in range(12)]
    body = {"model": TINY_NAME, "input": [{"image": b64(IMAGES[2])}], "labels": labels,
            "prompt_templates": ["a photo of a {}.", "a close-up of a {}.", "{}"]}
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: classify(serve_url, body), range(8)))
    spent = [r.usage.prompt_tokens for r in results]
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    once = int((tokenizer(prompts(labels, tuple(body["prompt_templates"]))) != 0).sum())
    assert sum(spent) == once, spent  # one request encoded the 36 prompts; the others waited for it
    assert len({tuple(p.label for p in r.data[0].predictions) for r in results}) == 1
