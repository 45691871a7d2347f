"""The hostile-input matrix: every limit, malformed bodies, wrong types, unknown routes and methods, and each
image format's broken and bomb variants. Each case gets its 4xx in OpenAI's error shape within a bounded
time, and afterwards the same normal request returns exactly the same vectors as before.

Against the session app (tests/conftest.py `app_args`, whose `limits` are small so that each is cheap to reach).
"""

import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from tests.conftest import TINY_NAME, b64, data_uri
from tests.integration.hostile_images import BOMBS, REAL, truncated
from tests.integration.test_api import JPEG, assert_error, vectors
from tests.unit.test_preprocess import png_header_only

BOUND_S = 15.0  # generous for a shared 2-core machine; each case is refused before any heavy work
NORMAL = {"model": TINY_NAME, "input": ["a photo of a cat", {"image": b64(JPEG)}, "dog"]}


@dataclass(frozen=True)
class Case:
    send: Callable[[str], "Answer"]
    status: int
    param: str | None = None
    words: str = ""


@dataclass(frozen=True)
class Answer:
    status: int
    text: str


def _post(path: str, body=None, **kwargs) -> Callable[[str], Answer]:
    def send(url: str) -> Answer:
        response = requests.post(url + path, json=body, timeout=60, **kwargs) if "data" not in kwargs else \
            requests.post(url + path, timeout=60, **kwargs)
        return Answer(response.status_code, response.text)

    return send


def _embed(body: dict) -> Callable[[str], Answer]:
    return _post("/v1/embeddings", {"model": TINY_NAME, **body})


def _classify(body: dict) -> Callable[[str], Answer]:
    return _post("/v1/classify", {"model": TINY_NAME, "input": ["x"], **body})


def _raw(body: bytes, content_type: str = "application/json", path: str = "/v1/embeddings") -> Callable[[str], Answer]:
    return _post(path, data=body, headers={"content-type": content_type})


def _method(method: str, path: str) -> Callable[[str], Answer]:
    def send(url: str) -> Answer:
        response = requests.request(method, url + path, timeout=60)
        return Answer(response.status_code, response.text)

    return send


def _declared_length(length: int) -> Callable[[str], Answer]:
    """Headers that announce a huge body, and no body at all: the answer must come before any is read."""

    def send(url: str) -> Answer:
        parts = urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            connection.putrequest("POST", "/v1/embeddings")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(length))
            connection.endheaders()
            response = connection.getresponse()
            return Answer(response.status, response.read().decode())
        finally:
            connection.close()

    return send


def _chunked(total: int, chunk: int = 64 * 1024) -> Callable[[str], Answer]:
    """A chunked body (no Content-Length) that grows past the cap."""

    def body():
        yield b'{"input": ["'
        sent = 0
        while sent < total:
            yield b"a" * chunk
            sent += chunk
        yield b'"]}'

    return _post("/v1/embeddings", data=body(), headers={"content-type": "application/json"})


def _image(raw: bytes) -> Callable[[str], Answer]:
    return _embed({"input": ["ok", {"image": b64(raw)}]})


CASES: dict[str, Case] = {
    # bodies
    "malformed-json": Case(_raw(b'{"input": ["a", '), 400, None, "json"),
    "not-json-at-all": Case(_raw(b"\x00\xff\xfe garbage"), 400),
    "deep-nesting": Case(_raw(b"[" * 200_000 + b"]" * 200_000), 400),
    "deep-nesting-in-input": Case(_raw(b"{\"input\": " + b"[" * 5000 + b"]" * 5000 + b"}"), 400),
    "huge-integer": Case(_raw(b'{"input": "x", "dimensions": ' + b"9" * 5000 + b"}"), 400),
    "huge-float-top-k": Case(_classify({"labels": ["a"], "top_k": 1e300}), 400, "top_k"),
    "body-null": Case(_raw(b"null"), 400),
    "body-over-cap-with-length": Case(_raw(b'{"input": "' + b"a" * 4_100_000 + b'"}'), 413, None, "limit"),
    "body-declared-huge-never-sent": Case(_declared_length(10**12), 413, None, "limit"),
    "body-over-cap-chunked": Case(_chunked(4_200_000), 413, None, "limit"),
    # wrong types
    "input-object": Case(_embed({"input": {"a": 1}}), 400, "input"),
    "labels-a-string": Case(_classify({"labels": "cat"}), 400, "labels"),
    "model-a-number": Case(_embed({"model": 5, "input": "x"}), 400, "model"),
    "encoding-format-list": Case(_embed({"input": "x", "encoding_format": ["float"]}), 400, "encoding_format"),
    # routes and methods
    "unknown-route": Case(_method("GET", "/v1/nothing"), 404),
    "unknown-deep-route": Case(_method("POST", "/../../etc/passwd"), 404),
    "wrong-method-get": Case(_method("GET", "/v1/embeddings"), 405),
    "wrong-method-delete": Case(_method("DELETE", "/v1/models"), 405),
    # lone surrogates: not valid Unicode
    "surrogate-model": Case(_raw(b'{"model": "\\ud800", "input": "x"}'), 400, "model", "unicode"),
    "surrogate-text": Case(_raw(b'{"input": ["ok", "\\udfff"]}'), 400, "input", "unicode"),
    "surrogate-label": Case(_raw(b'{"input": "x", "labels": ["\\ud800"]}', path="/v1/classify"), 400, "labels",
                            "unicode"),
    # texts and labels
    "text-too-long": Case(_embed({"input": ["ok", "w" * 1001]}), 400, "input[1]", "1000"),
    "one-huge-word": Case(_embed({"input": "z" * 8000}), 400, "input", "characters"),
    "request-text-chars": Case(_embed({"input": ["word " * 180] * 25}), 400, "input", "together"),
    "label-too-long": Case(_classify({"labels": ["cat", "l" * 1001]}), 400, "labels[1]"),
    "too-many-labels": Case(_classify({"labels": [f"l{i}" for i in range(51)]}), 400, "labels"),
    # prompt templates
    "template-format-spec": Case(_classify({"labels": ["a"], "prompt_templates": ["{{}}{:>20000000}"]}), 400,
                                 "prompt_templates[0]"),
    "template-attribute": Case(_classify({"labels": ["a"], "prompt_templates": ["{.__class__}"]}), 400,
                               "prompt_templates[0]"),
    "template-conversion": Case(_classify({"labels": ["a"], "prompt_templates": ["ok {}", "{!r}"]}), 400,
                                "prompt_templates[1]"),
    "template-index": Case(_classify({"labels": ["a"], "prompt_templates": ["{0[0]}"]}), 400, "prompt_templates[0]"),
    "template-too-long": Case(_classify({"labels": ["a"], "prompt_templates": ["t" * 100 + "{}"]}), 400,
                              "prompt_templates[0]"),
    "labels-times-templates": Case(
        _classify({"labels": [f"l{i}" for i in range(50)], "prompt_templates": [f"{i} {{}}" for i in range(41)]}),
        400, "labels", "prompts"),
    # items per request
    "too-many-inputs": Case(_embed({"input": ["x"] * 65}), 400, "input", "at most 64"),
    "too-many-messages": Case(_embed({"messages": [{"content": "x"}] * 65}), 400, "messages"),
    "too-many-documents": Case(_post("/v1/rerank", {"query": "q", "documents": ["d"] * 65}), 400, "documents"),
    # images: per request
    "request-pixels": Case(_embed({"input": [{"image": b64(png_header_only(1800, 1800))}] * 2}), 413, "input",
                           "pixels"),
    "request-image-bytes": Case(_embed({"input": [{"image": b64(bytes(1_400_000))}] * 2}), 413, "input", "bytes"),
    "image-url-when-off": Case(_embed({"input": [{"image": "http://127.0.0.1:9/x.png"}]}), 400, "input[0]"),
    "data-uri-svg": Case(_embed({"input": [{"image": data_uri(b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                                                              "image/svg+xml")}]}), 400, "input[0]"),
}
for _fmt in REAL:
    CASES[f"{_fmt.lower()}-truncated"] = Case(_image(truncated(_fmt)), 400, "input[1]")
    CASES[f"{_fmt.lower()}-bomb"] = Case(_image(BOMBS[_fmt]()), 413, "input[1]", "pixels")


@pytest.fixture(scope="module")
def baseline(serve_url) -> np.ndarray:
    return vectors(requests.post(serve_url + "/v1/embeddings", json=NORMAL, timeout=60))


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_gets_its_4xx_quickly_and_changes_nothing(serve_url, baseline, name):
    case = CASES[name]
    start = time.monotonic()
    answer = case.send(serve_url)
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, f"{name}: {elapsed:.1f}s"
    assert_error(_as_response(answer), case.status, case.param, case.words)
    after = vectors(requests.post(serve_url + "/v1/embeddings", json=NORMAL, timeout=60))
    np.testing.assert_array_equal(after, baseline)


def _as_response(answer: Answer) -> requests.Response:
    response = requests.Response()
    response.status_code = answer.status
    response._content = answer.text.encode()
    return response
