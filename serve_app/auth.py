"""API keys: where they come from (args, environment, a file) and the constant-time check of a request's.

Keys are resolved in the ingress replica's constructor (never at import) from, in this order of union:
the `api_keys` arg, `CLIP_API_KEYS` (comma-separated), and a file named by the `api_keys_file` arg or
`CLIP_API_KEYS_FILE` (one key a line, `#` comments), so that a Kubernetes Secret can supply them as an
environment variable or a mounted file. Keys are never logged; only their count is.
"""

import hmac
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

ENV_KEYS = "CLIP_API_KEYS"
ENV_KEYS_FILE = "CLIP_API_KEYS_FILE"

# Routes that answer without a key: liveness only (a Kubernetes livenessProbe sends no header).
OPEN_ROUTES = frozenset({"/livez"})


def resolve_api_keys(
    api_keys: list[str] | None, api_keys_file: str | None, environ: Mapping[str, str] = os.environ
) -> tuple[bytes, ...]:
    """Every configured key, as UTF-8 bytes (what `hmac.compare_digest` compares); empty means open."""
    keys: list[str] = list(api_keys or [])
    keys += [k for k in environ.get(ENV_KEYS, "").split(",")]
    path = api_keys_file or environ.get(ENV_KEYS_FILE)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the API keys file {path}: {exc.strerror}") from None
        keys += [line.split("#", 1)[0] for line in text.splitlines()]
    cleaned = [k.strip() for k in keys if k.strip()]
    for key in cleaned:
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ValueError("an API key contains whitespace or unprintable characters")
    return tuple(dict.fromkeys(k.encode("utf-8") for k in cleaned))


def bearer_token(authorization: str | None) -> bytes | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogateescape")


def key_matches(token: bytes | None, keys: tuple[bytes, ...]) -> bool:
    """Constant-time against every key: the time taken says nothing about which key, or how much, matched."""
    if token is None:
        return False
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token, key)
    return matched


def is_loopback_host(host: str | None) -> bool:
    """Whether a bind host reaches this machine only ('127.0.0.1', '::1', 'localhost')."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_network_warning(host: str | None, port: int | None, keys: object) -> str | None:
    """The loud start-up warning of a service bound beyond loopback with no API keys, else None."""
    if keys or is_loopback_host(host):
        return None
    return (
        f"SECURITY WARNING: the HTTP API listens on {host or '0.0.0.0'}:{port} (not loopback) and NO API KEYS "
        f"are set: anyone who can reach this address can use it. Set `api_keys`, {ENV_KEYS} or {ENV_KEYS_FILE} "
        "(README.md, section Security), or bind http_options.host to 127.0.0.1."
    )
