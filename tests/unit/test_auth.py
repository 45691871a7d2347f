"""API keys (no Ray): their sources, the constant-time bearer check, the middleware's 401, the open-bind warning."""

import asyncio

import pytest

from serve_app.auth import bearer_token, is_loopback_host, key_matches, open_network_warning, resolve_api_keys


def test_keys_from_args_env_and_file(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated monthly\nfile-key-1\n\n  file-key-2  # comment\n")
    keys = resolve_api_keys(["arg-key"], None, {"CLIP_API_KEYS": "env-a, env-b,,", "CLIP_API_KEYS_FILE": str(keys_file)})
    assert keys == (b"arg-key", b"env-a", b"env-b", b"file-key-1", b"file-key-2")
    assert resolve_api_keys(None, str(keys_file), {}) == (b"file-key-1", b"file-key-2")
    assert resolve_api_keys(None, None, {}) == ()
    assert resolve_api_keys(["k", "k"], None, {}) == (b"k",)
    with pytest.raises(ValueError, match="cannot read"):
        resolve_api_keys(None, str(tmp_path / "missing"), {})
    with pytest.raises(ValueError, match="whitespace") as info:
        resolve_api_keys(["has space"], None, {})
    assert "has space" not in str(info.value)  # a key never appears in a message


def test_bearer_parsing_and_constant_time_match():
    assert bearer_token("Bearer abc") == b"abc" and bearer_token("bearer   abc ") == b"abc"
    assert bearer_token(None) is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    keys = (b"first", b"second")
    assert key_matches(b"second", keys) and key_matches(b"first", keys)
    assert not key_matches(b"secon", keys) and not key_matches(None, keys) and not key_matches(b"x", ())


def test_open_bind_warning():
    assert open_network_warning("127.0.0.1", 8000, ()) is None
    assert open_network_warning("::1", 8000, ()) is None and is_loopback_host("localhost")
    assert open_network_warning("0.0.0.0", 8000, (b"k",)) is None
    warning = open_network_warning("0.0.0.0", 8000, ())
    assert "NO API KEYS" in warning and "0.0.0.0:8000" in warning
    assert open_network_warning("10.1.2.3", 8000, ()) and open_network_warning(None, 8000, ())


async def _status(headers: dict[str, str], path: str = "/v1/models") -> tuple[int, dict[str, str], bytes]:
    from serve_app.ingress import EveryRequest

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await EveryRequest(app)(scope, receive, send)
    response_headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
    return sent[0]["status"], response_headers, sent[1]["body"]


def test_middleware_asks_every_route_but_livez_for_a_key(monkeypatch, tmp_path):
    from serve_app import ingress
    from serve_app.config import TenancySettings
    from serve_app.tenancy.gate import Tenancy
    from serve_app.tenancy.keys import KeyRing

    settings = TenancySettings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'usage.db'}")

    async def run() -> None:
        tenancy = Tenancy(settings, KeyRing.from_secrets((b"sk-right",)))
        monkeypatch.setattr(ingress.GUARD, "tenancy", tenancy)
        status, headers, body = await _status({})
        assert status == 401 and headers["www-authenticate"] == "Bearer" and b"Missing API key" in body
        status, headers, body = await _status({"authorization": "Bearer sk-wrong"})
        assert status == 401 and b"sk-wrong" not in body and b"Incorrect API key" in body
        assert b'"invalid_api_key"' in body
        assert (await _status({"authorization": "Bearer sk-right"}))[0] == 200
        assert (await _status({}, "/livez"))[0] == 200
        assert (await _status({}, "/v1/nothing"))[0] == 401  # unknown routes too: nothing is revealed
        # an ordinary key does not reach the admin routes
        assert (await _status({"authorization": "Bearer sk-right"}, "/v1/organization/api_keys"))[0] == 403
        await tenancy.close()
        monkeypatch.setattr(ingress.GUARD, "tenancy", Tenancy(settings, KeyRing.from_secrets(())))
        assert (await _status({}))[0] == 200  # no keys configured: open

    asyncio.run(run())
