"""End to end over real HTTP against `serve.run` with the tiny model: fidelity, dialects, SDK, errors, load."""

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests
import torch
from PIL import Image, ImageOps

from serve_app.protocol import EmbeddingResponse, ErrorResponse, HealthResponse, ModelList
from tests.conftest import SECOND_NAME, TINY_NAME, b64, data_uri, encode, random_image
from tests.unit.test_preprocess import png_header_only

MIN_COSINE = 0.9999


def post(url: str, body, path: str = "/v1/embeddings", **kwargs) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60, **kwargs)


def vectors(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    parsed = EmbeddingResponse.model_validate_json(response.text)
    assert [d.index for d in parsed.data] == list(range(len(parsed.data)))
    return np.array([d.embedding for d in parsed.data], dtype=np.float32)


def expected_image(reference, raw: bytes) -> np.ndarray:
    model, preprocess, _ = reference
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))
    with torch.no_grad():
        return model.encode_image(preprocess(image).unsqueeze(0), normalize=True)[0].numpy()


def expected_text(reference, text: str) -> np.ndarray:
    model, _, tokenizer = reference
    with torch.no_grad():
        return model.encode_text(tokenizer([text]), normalize=True)[0].numpy()


def assert_same(got: np.ndarray, expected: np.ndarray) -> None:
    cosine = float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)))
    assert cosine >= MIN_COSINE, cosine
    assert abs(np.linalg.norm(got) - 1.0) < 1e-5


def assert_error(response: requests.Response, status: int, param: str | None = None, words: str = "",
                 code: str | None = None) -> dict:
    """`code` is OpenAI's where it names one (`invalid_api_key`, `rate_limit_exceeded`), else the status."""
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate_json(response.text).error
    assert error.code == (code or status)
    if param is not None:
        assert error.param == param, error
    assert words.lower() in error.message.lower(), error.message
    return error.model_dump()


JPEG = encode(random_image(200, 150, seed=21), "JPEG", quality=92)
PNG_RGBA = encode(random_image(64, 96, seed=22, mode="RGBA"))


# ------------------------------------------------------------------ fidelity, every dialect


def test_text_vectors_equal_open_clip(serve_url, reference):
    texts = ["a photo of a dog", "a diagram", "word " * 100]
    got = vectors(post(serve_url, {"input": texts, "model": TINY_NAME}))
    for row, text in zip(got, texts):
        assert_same(row, expected_text(reference, text))


DIALECTS = {
    "modality-image-data-uri": lambda: {"input": [data_uri(JPEG, "image/jpeg")], "modality": "image"},
    "modality-image-bare-base64": lambda: {"input": b64(JPEG), "modality": "image"},
    "openai-content-part": lambda: {"input": [{"type": "image_url", "image_url": {"url": data_uri(JPEG)}}]},
    "jina-object": lambda: {"input": [{"image": b64(JPEG)}]},
    "vllm-messages": lambda: {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(JPEG)}}]}]
    },
}


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_image_vectors_equal_open_clip_in_every_dialect(serve_url, reference, dialect):
    got = vectors(post(serve_url, {**DIALECTS[dialect](), "model": TINY_NAME}))
    assert got.shape == (1, 32)
    assert_same(got[0], expected_image(reference, JPEG))


def test_mixed_text_and_images_keep_their_order(serve_url, reference):
    body = {
        "model": TINY_NAME,
        "input": [
            {"text": "first"},
            {"type": "image_url", "image_url": {"url": data_uri(PNG_RGBA)}},
            "third",
            {"image": data_uri(JPEG, "image/jpeg")},
            {"type": "text", "text": "fifth"},
        ],
    }
    response = post(serve_url, body)
    got = vectors(response)
    expected = [
        expected_text(reference, "first"),
        expected_image(reference, PNG_RGBA),
        expected_text(reference, "third"),
        expected_image(reference, JPEG),
        expected_text(reference, "fifth"),
    ]
    for row, want in zip(got, expected):
        assert_same(row, want)
    usage = response.json()["usage"]
    tokenizer = reference[2]
    assert usage["prompt_tokens"] == usage["total_tokens"] == int((tokenizer(["first", "third", "fifth"]) != 0).sum())


def test_model_may_be_omitted_and_dimensions_equal_to_the_model_is_accepted(serve_url, reference):
    got = vectors(post(serve_url, {"input": "hi", "dimensions": 32}))
    assert_same(got[0], expected_text(reference, "hi"))


def test_base64_encoding_is_little_endian_float32(serve_url, reference):
    response = post(serve_url, {"input": ["hi"], "encoding_format": "base64"})
    encoded = response.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert_same(decoded, expected_text(reference, "hi"))


# ------------------------------------------------------------------ the official openai SDK, unchanged


@pytest.fixture(scope="module")
def client(serve_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=serve_url + "/v1", api_key="unused", max_retries=0)


def test_openai_sdk_text_default_base64_and_float(client, reference):
    default = client.embeddings.create(input=["a red car", "a blue sky"], model=TINY_NAME)
    as_float = client.embeddings.create(input="a red car", model=TINY_NAME, encoding_format="float")
    assert default.model == TINY_NAME and len(default.data) == 2
    assert_same(np.array(default.data[0].embedding, dtype=np.float32), expected_text(reference, "a red car"))
    assert_same(np.array(default.data[1].embedding, dtype=np.float32), expected_text(reference, "a blue sky"))
    assert_same(np.array(as_float.data[0].embedding, dtype=np.float32), expected_text(reference, "a red car"))
    assert default.usage.prompt_tokens > 0


def test_openai_sdk_images_via_extra_body(client, reference):
    result = client.embeddings.create(
        input=[data_uri(JPEG, "image/jpeg")], model=TINY_NAME, extra_body={"modality": "image"}
    )
    assert_same(np.array(result.data[0].embedding, dtype=np.float32), expected_image(reference, JPEG))
    parts = client.embeddings.create(
        input=[],  # replaced by messages: vLLM's dialect
        model=TINY_NAME,
        extra_body={"input": None, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(PNG_RGBA)}}, {"type": "text", "text": "x"}]}]},
    )
    assert_same(np.array(parts.data[0].embedding, dtype=np.float32), expected_image(reference, PNG_RGBA))
    assert_same(np.array(parts.data[1].embedding, dtype=np.float32), expected_text(reference, "x"))


def test_openai_sdk_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(input="x", model="no-such-model")
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(input=[[1, 2, 3]], model=TINY_NAME)
    assert "token-id" in str(info.value)


def test_models_health_and_openapi(serve_url, client):
    models = ModelList.model_validate(requests.get(serve_url + "/v1/models", timeout=30).json())
    assert [m.id for m in models.data] == [TINY_NAME, SECOND_NAME]
    assert models.data[0].embedding_dimensions == 32 and models.data[0].image_size == [48, 48]
    assert [m.id for m in client.models.list()] == [TINY_NAME, SECOND_NAME]
    health = requests.get(serve_url + "/health", timeout=30)
    assert health.status_code == 200
    report = HealthResponse.model_validate(health.json())
    assert report.status == "ok" and report.models[TINY_NAME].ok and report.models[SECOND_NAME].ok
    assert report.models[TINY_NAME].last_encode_age_s is not None
    spec = requests.get(serve_url + "/openapi.json", timeout=30).json()
    assert {"/v1/embeddings", "/v1/classify", "/v1/rerank", "/v1/models", "/health"} <= set(spec["paths"])


# ------------------------------------------------------------------ errors: OpenAI shape, 4xx, never 500

BAD_REQUESTS = {
    "bad-base64": ({"input": ["@@@"], "modality": "image"}, 400, "input[0]", "base64"),
    "not-an-image": ({"input": [{"image": b64(b"plain text")}]}, 400, "input[0]", "not an image"),
    "truncated-image": ({"input": ["ok", {"image": b64(JPEG[: len(JPEG) // 2])}]}, 400, "input[1]", "truncated"),
    "bomb": ({"input": [{"image": b64(png_header_only(20000, 20000))}]}, 413, "input[0]", "pixels"),
    "unknown-model": ({"input": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    "empty-list": ({"input": []}, 400, "input", "at least one"),
    "missing-input": ({"model": TINY_NAME}, 400, "input", "required"),
    "too-many": ({"input": ["x"] * 65}, 400, "input", "at most 64"),
    "wrong-type": ({"input": 3.5}, 400, "input", ""),
    "wrong-item-type": ({"input": ["ok", {"foo": "bar"}]}, 400, "input[1]", "input object"),
    "wrong-nested-type": ({"input": [{"type": "image_url", "image_url": 5}]}, 400, "input[0].image_url", ""),
    "bad-encoding-format": ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format", ""),
    "bad-dimensions": ({"input": "x", "dimensions": 16}, 400, "dimensions", "32"),
    "token-ids": ({"input": [1, 2, 3]}, 400, "input", "token-id"),
    "token-id-lists": ({"input": [[1, 2], [3]]}, 400, "input[0]", "token-id"),
    "image-url": ({"input": [{"image": "https://example.com/a.jpg"}]}, 400, "input[0]", "not enabled"),
    "empty-text": ({"input": [""]}, 400, "input[0]", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_openai_errors(serve_url, case):
    body, status, param, words = BAD_REQUESTS[case]
    assert_error(post(serve_url, {"model": TINY_NAME, **body} if "model" not in body else body), status, param, words)


def test_malformed_bodies_and_unknown_routes(serve_url):
    assert_error(requests.post(serve_url + "/v1/embeddings", data=b"{not json", timeout=30,
                               headers={"content-type": "application/json"}), 400, None, "json")
    assert_error(requests.post(serve_url + "/v1/embeddings", timeout=30), 400)
    assert_error(requests.post(serve_url + "/v1/embeddings", json=[1, 2], timeout=30), 400)
    assert_error(requests.get(serve_url + "/v1/nothing", timeout=30), 404)
    assert_error(requests.get(serve_url + "/v1/embeddings", timeout=30), 405)


def test_every_response_carries_a_request_id(serve_url):
    response = post(serve_url, {"input": "x"}, headers={"x-request-id": "trace-me"})
    assert response.headers["x-request-id"] == "trace-me"
    assert post(serve_url, {"input": []}).headers["x-request-id"]


# ------------------------------------------------------------------ under concurrent load


def test_concurrent_requests_equal_serial_ones_and_bad_items_fail_alone(serve_url):
    images = [encode(random_image(80 + i, 60 + 2 * i, seed=100 + i), "JPEG") for i in range(10)]
    bodies = []
    for i in range(30):
        if i % 3 == 0:
            bodies.append({"input": [f"caption number {i}", "x " * (i + 1)]})
        elif i % 3 == 1:
            bodies.append({"input": [{"image": b64(images[i % 10])}, f"text {i}"]})
        else:
            bodies.append({"input": [data_uri(images[(i + 3) % 10]), data_uri(images[i % 10])], "modality": "image"})
    bad = [{"input": [{"image": b64(b"garbage")}]}, {"input": [{"image": b64(images[0][:200])}]}]
    serial = [vectors(post(serve_url, b)) for b in bodies]
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(post, serve_url, b) for b in bodies + bad * 5]
        responses = [f.result() for f in futures]
    for got, want in zip(responses[: len(bodies)], serial):
        np.testing.assert_allclose(vectors(got), want, atol=1e-5)
    for response in responses[len(bodies):]:
        assert_error(response, 400, "input[0]")
    # still healthy and correct afterwards: nothing was poisoned
    assert requests.get(serve_url + "/health", timeout=30).status_code == 200
    np.testing.assert_allclose(vectors(post(serve_url, bodies[1])), serial[1], atol=1e-5)
