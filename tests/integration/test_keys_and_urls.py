"""API keys and image URLs over real HTTP, on a second app in the session's Ray (one-process layout):
keys from the arg and a file (the environment variable is read by the same function: tests/unit/test_auth.py;
it is not set here through Serve's `env_vars`, because Ray's runtime-env agent logs those); the real `openai`
SDK's `api_key`; URLs from a server on 127.0.0.1 allowed by the list. No traffic leaves 127.0.0.1."""

import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import openai
import pytest
import requests

from tests.conftest import TINY_NAME, b64
from tests.integration.test_api import assert_error, vectors
from tests.unit.test_fetch import PNG, _Handler

ARG_KEY, FILE_KEY = "sk-arg-7f3a9c", "sk-file-c04b77"


@pytest.fixture(scope="module")
def image_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def guarded_url(serve_url, tiny_model_dir: Path, tmp_path_factory) -> Iterator[str]:
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppArgs

    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    keys_file.write_text(f"# one a line\n{FILE_KEY}\n")
    args = AppArgs.model_validate({
        "model": f"local-dir:{tiny_model_dir}", "served_model_name": TINY_NAME, "device": "cpu",
        "layout": "one-process", "torch_threads": 1,
        "encoder": {"num_replicas": 1, "num_cpus": 0.25},
        "image_limits": {"max_image_bytes": 1_000_000},
        "api_keys": [ARG_KEY], "api_keys_file": str(keys_file), "image_url_policy": ["127.0.0.1"],
    })
    serve.run(build_app(args), name="guarded", route_prefix="/guarded", blocking=False)
    url = serve_url + "/guarded"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/livez", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        pytest.fail("the guarded app did not start")
    yield url
    serve.delete("guarded")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_livez_needs_a_key(guarded_url):
    assert requests.get(guarded_url + "/livez", timeout=30).json() == {"status": "ok"}
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/embeddings"),
                         ("GET", "/openapi.json"), ("GET", "/v1/unknown")):
        response = requests.request(method, guarded_url + path, json={"input": "x"}, timeout=30)
        assert_error(response, 401, None, "api key", code="invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = requests.get(guarded_url + "/v1/models", headers=_auth("sk-nope"), timeout=30)
    assert_error(wrong, 401, None, "incorrect", code="invalid_api_key") and "sk-nope" not in wrong.text
    assert requests.get(guarded_url + "/health", headers=_auth(ARG_KEY), timeout=30).status_code == 200


@pytest.mark.parametrize("key", [ARG_KEY, FILE_KEY], ids=["arg", "file"])
def test_openai_sdk_api_key_works_from_every_source(guarded_url, key):
    client = openai.OpenAI(base_url=guarded_url + "/v1", api_key=key, max_retries=0)
    result = client.embeddings.create(input=["a red car"], model=TINY_NAME, encoding_format="float")
    assert len(result.data[0].embedding) == 32


def test_openai_sdk_wrong_key_is_its_authentication_error(guarded_url):
    client = openai.OpenAI(base_url=guarded_url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.embeddings.create(input="x", model=TINY_NAME)


def test_image_urls_on_the_list_are_fetched_concurrently_and_equal_inline_images(guarded_url, image_port):
    inline = vectors(requests.post(guarded_url + "/v1/embeddings", headers=_auth(ARG_KEY), timeout=60,
                                   json={"input": [{"image": b64(PNG)}]}))
    body = {"input": [{"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{image_port}/img.png"}},
                      "text", {"image": f"http://127.0.0.1:{image_port}/to-img"}]}
    got = vectors(requests.post(guarded_url + "/v1/embeddings", headers=_auth(ARG_KEY), json=body, timeout=60))
    # the same pixels; two images in one forward pass may differ from one alone in the last float bits
    np.testing.assert_allclose(got[0], inline[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[2], inline[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("path, status, words", [
    ("/to-localhost", 400, "allow-list"), ("/missing", 400, "404"), ("/big", 413, "limit"),
])
def test_refused_image_urls_name_their_input(guarded_url, image_port, path, status, words):
    body = {"input": ["ok", {"image": f"http://127.0.0.1:{image_port}{path}"}]}
    response = requests.post(guarded_url + "/v1/embeddings", headers=_auth(ARG_KEY), json=body, timeout=60)
    assert_error(response, status, "input[1]", words)


def test_keys_are_never_logged(guarded_url):
    """Ray's logs of this session (every replica's and the controller's) name no key."""
    import ray

    requests.get(guarded_url + "/v1/models", headers=_auth("sk-not-a-key-in-logs"), timeout=30)
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    time.sleep(2)  # buffered request logs
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for key in (ARG_KEY, FILE_KEY, "sk-not-a-key-in-logs"):
                assert key.encode() not in text, (key, path)
