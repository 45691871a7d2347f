"""Image URL fetching (no Ray): the policy, address checks, pinned connections, redirects, caps, timeouts.

Every server here listens on 127.0.0.1; nothing is sent anywhere else (names that would resolve elsewhere are
refused by the allow-list before any lookup, or are IP literals that getaddrinfo parses without a lookup).
"""

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.config import AppArgs, RequestLimits
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.fetch import Budget, ImageFetcher, host_allowed, refused_address
from tests.conftest import encode, random_image

PNG = encode(random_image(40, 30, seed=3))


class _Handler(BaseHTTPRequestHandler):
    hosts_seen: list[str] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        _Handler.hosts_seen.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        routes = {
            "/img.png": lambda: self._send(200, PNG),
            "/to-img": lambda: self._redirect("/img.png"),
            "/to-localhost": lambda: self._redirect(f"http://localhost:{port}/img.png"),
            "/loop": lambda: self._redirect("/loop"),
            "/missing": lambda: self._send(404, b"no"),
            "/big": self._big,
            "/slow": self._slow,
        }
        routes.get(self.path.split("?")[0], lambda: self._send(404, b""))()

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _big(self) -> None:  # no Content-Length: the cap must hold while streaming
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    def _slow(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def fetch(policy, url: str, limits: RequestLimits | None = None, max_image_bytes: int = 1_000_000,
          budget: int = 10_000_000) -> bytes:
    fetcher = ImageFetcher(policy, limits or RequestLimits(), max_image_bytes)
    return asyncio.run(fetcher.fetch(url, "input[0]", Budget(budget)))


def test_allowed_host_is_fetched_with_its_host_header(image_server):
    _Handler.hosts_seen.clear()
    assert fetch(["127.0.0.1"], f"http://127.0.0.1:{image_server}/img.png") == PNG
    assert fetch([f"127.0.0.1:{image_server}"], f"http://127.0.0.1:{image_server}/to-img") == PNG
    assert _Handler.hosts_seen[0] == f"127.0.0.1:{image_server}"


@pytest.mark.parametrize("path, error, words", [
    ("/to-localhost", InvalidRequest, "allow-list"),  # resolves to an allowed address, but not the host as written
    ("/loop", InvalidRequest, "redirected more than"),
    ("/missing", InvalidRequest, "HTTP 404"),
    ("/big", PayloadTooLarge, "byte limit"),
])
def test_refused_fetches(image_server, path, error, words):
    with pytest.raises(error, match=words) as info:
        fetch(["127.0.0.1"], f"http://127.0.0.1:{image_server}{path}")
    assert info.value.param == "input[0]"


def test_the_request_budget_is_shared_and_counted_while_streaming(image_server):
    with pytest.raises(PayloadTooLarge) as info:
        fetch(["127.0.0.1"], f"http://127.0.0.1:{image_server}/img.png", budget=len(PNG) - 1)
    assert info.value.param == "input"


def test_total_timeout(image_server):
    start = time.monotonic()
    with pytest.raises(InvalidRequest, match="within"):
        fetch(["127.0.0.1"], f"http://127.0.0.1:{image_server}/slow", RequestLimits(url_total_timeout_s=1.0))
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("host", [
    "127.0.0.1", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.1", "127.1", "[::1]", "[::ffff:127.0.0.1]",
    "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1", "240.0.0.1",
    "100.64.0.1", "[fe80::1]", "[fc00::1]", "[fec0::1]",
])
def test_public_policy_refuses_every_spelling_of_non_public_addresses(image_server, host):
    with pytest.raises(InvalidRequest) as info:
        fetch("public", f"http://{host}:{image_server}/img.png")
    assert info.value.param == "input[0]"
    # the same words as for a name that does not resolve: no oracle for internal names and addresses
    assert info.value.message == REFUSED.format(host=host.strip("[]"))


REFUSED = "image URL host {host!r} does not resolve to an address this server fetches from"


def test_a_name_that_does_not_resolve_gets_the_same_answer_as_a_refused_address():
    with pytest.raises(InvalidRequest) as info:
        fetch("public", "http://no-such-host.invalid/img.png")
    assert info.value.message == REFUSED.format(host="no-such-host.invalid")


def test_when_one_fetch_fails_the_others_of_its_request_are_cancelled():
    from serve_app.preprocess import all_or_nothing

    async def scenario():
        finished, cancelled = [], []

        async def slow(i):
            try:
                await asyncio.sleep(5)
                finished.append(i)
            except asyncio.CancelledError:
                cancelled.append(i)
                raise

        async def bad():
            await asyncio.sleep(0.05)
            raise InvalidRequest("image URL answered HTTP 404", param="input[1]")

        start = time.monotonic()
        with pytest.raises(InvalidRequest, match="404"):
            await all_or_nothing([slow(0), bad(), slow(2)])
        return time.monotonic() - start, finished, cancelled

    elapsed, finished, cancelled = asyncio.run(scenario())
    assert elapsed < 1 and finished == [] and sorted(cancelled) == [0, 2]


@pytest.mark.parametrize("url, words", [
    ("ftp://127.0.0.1/x.png", "http or https"),
    ("file:///etc/passwd", "http or https"),
    ("http://user:pw@127.0.0.1/x.png", "credentials"),
    ("http://127.0.0.1:99999/x.png", "malformed"),
    ("http:///x.png", "no host"),
    ("http://example.com/x.png", "allow-list"),  # refused before any lookup
])
def test_malformed_and_unlisted_urls(url, words):
    with pytest.raises(InvalidRequest, match=words):
        fetch(["127.0.0.1"], url)


def test_off_refuses_everything(image_server):
    with pytest.raises(InvalidRequest, match="not enabled"):
        fetch("off", f"http://127.0.0.1:{image_server}/img.png")


def test_address_rules_and_host_matching():
    assert refused_address(ipaddress.ip_address("8.8.8.8")) is None
    assert refused_address(ipaddress.ip_address("2606:4700::1111")) is None
    assert "IPv4-mapped" in refused_address(ipaddress.ip_address("::ffff:8.8.8.8"))
    assert refused_address(ipaddress.ip_address("2002:7f00:1::1"))  # 6to4 of 127.0.0.1
    assert host_allowed(["images.example.com"], "images.example.com", 443)
    assert host_allowed(["images.example.com:8443"], "images.example.com", 8443)
    assert not host_allowed(["images.example.com:8443"], "images.example.com", 443)
    assert host_allowed(["[::1]"], "::1", 80) and not host_allowed(["example.com"], "sub.example.com", 80)


def test_policy_config():
    assert AppArgs().image_url_policy == "off"
    assert AppArgs.model_validate({"image_url_policy": ["Images.Example.com:443 "]}).image_url_policy == [
        "images.example.com:443"]
    for bad in ([], ["http://x/"], "everything"):
        with pytest.raises(ValueError):
            AppArgs.model_validate({"image_url_policy": bad})


def test_proxy_environment_is_ignored(image_server, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # a proxy that would refuse: it must not be used
    assert fetch(["127.0.0.1"], f"http://127.0.0.1:{image_server}/img.png") == PNG


def test_the_connection_goes_to_the_checked_address_with_the_written_host(image_server, monkeypatch):
    """A name only our resolver knows: were the connection to resolve it again (DNS rebinding), it would fail."""
    from serve_app import fetch as fetch_module

    asked = []

    async def resolve(host, port):
        asked.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(fetch_module, "resolve", resolve)
    _Handler.hosts_seen.clear()
    assert fetch(["images.invalid"], f"http://images.invalid:{image_server}/to-img") == PNG
    assert asked == ["images.invalid", "images.invalid"]  # once per hop: the redirect was checked again
    assert _Handler.hosts_seen == [f"images.invalid:{image_server}"] * 2
