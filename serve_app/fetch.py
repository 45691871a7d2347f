"""Fetching image URLs safely, in the preprocessing pool (`image_url_policy`).

- "off": URLs are refused at the ingress (inputs.py); nothing here runs.
- "public": http/https to public addresses only. Loopback, private, link-local, multicast, reserved,
  unspecified, shared (100.64/10) and IPv4-mapped/6to4/Teredo IPv6 addresses are refused, whatever the URL's
  spelling of them: the host is resolved by the system's getaddrinfo, which also reads decimal, octal and
  hex IPv4 forms (`2130706433`, `0177.0.0.1`, `0x7f.1`), and every address it returns is checked.
- a list: only hosts on it, matched against the URL's host as written (`host`, any port, or `host:port`);
  a redirect to a host not on the list is refused even when it resolves to an allowed address.

The host is resolved once per hop and the connection goes to the checked address (httpcore with a network
backend pinned to it), while the Host header, TLS SNI and certificate checks use the URL's host: no DNS
rebinding between check and connect. Every redirect is checked again (at most `url_max_redirects`). Bytes are
counted while streaming, against the per-image cap and the request's shared budget. Connect and total
timeouts apply; proxy environment variables are never read (httpcore does not look at them).
"""

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpcore

from serve_app.config import ImageURLPolicy, RequestLimits
from serve_app.errors import InvalidRequest, PayloadTooLarge

USER_AGENT = b"clip-serve-image-fetch/1"
REDIRECTS = (301, 302, 303, 307, 308)
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def refused_address(address: Address) -> str | None:
    """Why `address` is not a public unicast address, or None if it is."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if address.sixtofour is not None or address.teredo is not None:
            return "an IPv6 address that embeds an IPv4 one"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:  # fec0::/10, deprecated, not global
        return "a site-local address"
    checks = (
        ("loopback", address.is_loopback), ("private", address.is_private), ("link-local", address.is_link_local),
        ("multicast", address.is_multicast), ("reserved", address.is_reserved),
        ("unspecified", address.is_unspecified), ("not globally routable", not address.is_global),
    )
    for name, hit in checks:
        if hit:
            return f"a {name} address"
    return None


async def resolve(host: str, port: int) -> list[Address]:
    """The system's addresses for `host` (it also parses every IPv4 spelling inet_aton takes)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def host_allowed(policy: list[str], host: str, port: int) -> bool:
    """`host` (as the URL writes it, lower-case, IPv6 without brackets) on the list, alone or with `port`."""
    written = f"[{host}]" if ":" in host else host
    return written in policy or f"{written}:{port}" in policy


@dataclass
class Budget:
    """Image bytes a request may still fetch, shared by its concurrent fetches."""

    remaining: int
    param: str = "input"
    spent: int = field(default=0)

    def take(self, n: int) -> None:
        self.spent += n
        if self.spent > self.remaining:
            raise PayloadTooLarge(
                f"the request's images passed the {self.remaining} byte limit while being fetched", param=self.param
            )


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the address that was checked, whatever host httpcore asks for (it keeps the URL's host for
    the Host header, SNI and certificate checks)."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_tcp(self._address, port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not fetched")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class ImageFetcher:
    def __init__(self, policy: ImageURLPolicy, limits: RequestLimits, max_image_bytes: int) -> None:
        self.policy = policy
        self.limits = limits
        self.max_image_bytes = max_image_bytes

    async def fetch(self, url: str, param: str, budget: Budget) -> bytes:
        """The body of `url` after at most `url_max_redirects` checked redirects; InvalidRequest or
        PayloadTooLarge (naming `param`) on anything refused, failed or too big."""
        try:
            return await asyncio.wait_for(self._follow(url, param, budget), self.limits.url_total_timeout_s)
        except asyncio.TimeoutError:
            raise InvalidRequest(
                f"image URL did not answer in full within {self.limits.url_total_timeout_s}s", param=param
            ) from None

    async def _follow(self, url: str, param: str, budget: Budget) -> bytes:
        for hop in range(self.limits.url_max_redirects + 1):
            host, port, address = await self.check(url, param)
            status, location, body = await self._get(url, host, port, address, param, budget)
            if status in REDIRECTS and location:
                url = urljoin(url, location)
                continue
            if status != 200:
                raise InvalidRequest(f"image URL answered HTTP {status}", param=param)
            return body
        raise InvalidRequest(f"image URL redirected more than {self.limits.url_max_redirects} times", param=param)

    async def check(self, url: str, param: str) -> tuple[str, int, str]:
        """(host as written, port, the one checked address to connect to) or InvalidRequest."""
        if self.policy == "off":
            raise InvalidRequest("image URLs are not enabled on this server", param=param)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise InvalidRequest("malformed image URL", param=param) from None
        if parts.scheme.lower() not in ("http", "https"):
            raise InvalidRequest("image URLs must be http or https", param=param)
        if parts.username is not None or parts.password is not None:
            raise InvalidRequest("image URLs must not carry credentials", param=param)
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise InvalidRequest("image URL has no host", param=param)
        port = port or (443 if parts.scheme.lower() == "https" else 80)
        if isinstance(self.policy, list) and not host_allowed(self.policy, host, port):
            raise InvalidRequest(f"image URL host {host!r} is not on this server's allow-list", param=param)
        # One answer for a host that does not resolve and one that resolves to a refused address: which of the
        # two it was would tell a client about internal names.
        refused = InvalidRequest(
            f"image URL host {host!r} does not resolve to an address this server fetches from", param=param
        )
        try:
            addresses = await asyncio.wait_for(resolve(host, port), self.limits.url_connect_timeout_s)
        except (OSError, asyncio.TimeoutError, UnicodeError, ValueError):
            raise refused from None
        if not addresses:
            raise refused
        if self.policy == "public" and any(refused_address(address) for address in addresses):
            raise refused
        return host, port, str(addresses[0])

    async def _get(
        self, url: str, host: str, port: int, address: str, param: str, budget: Budget
    ) -> tuple[int, str | None, bytes]:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        written = f"[{host}]" if ":" in host else host
        default_port = 443 if parts.scheme.lower() == "https" else 80
        host_header = written if port == default_port else f"{written}:{port}"
        request_url = httpcore.URL(scheme=parts.scheme.lower().encode(), host=host.encode("idna"), port=port,
                                   target=target.encode("utf-8", "surrogateescape"))
        timeouts = {"connect": self.limits.url_connect_timeout_s, "read": self.limits.url_total_timeout_s,
                    "write": self.limits.url_connect_timeout_s, "pool": self.limits.url_connect_timeout_s}
        headers = [(b"Host", host_header.encode("idna")), (b"User-Agent", USER_AGENT),
                   (b"Accept", b"image/*"), (b"Accept-Encoding", b"identity")]
        cap = self.max_image_bytes
        try:
            async with httpcore.AsyncConnectionPool(network_backend=_PinnedBackend(address), max_connections=1,
                                                    retries=0) as pool:
                async with pool.stream("GET", request_url, headers=headers,
                                       extensions={"timeout": timeouts}) as response:
                    values = {k.lower(): v for k, v in response.headers}
                    if response.status in REDIRECTS:
                        location = values.get(b"location", b"").decode("latin-1") or None
                        return response.status, location, b""
                    if response.status != 200:
                        return response.status, None, b""
                    length = values.get(b"content-length", b"")
                    if length.isdigit() and int(length) > cap:
                        raise PayloadTooLarge(f"image is larger than the {cap} byte limit", param=param)
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_stream():
                        size += len(chunk)
                        if size > cap:
                            raise PayloadTooLarge(f"image is larger than the {cap} byte limit", param=param)
                        budget.take(len(chunk))
                        chunks.append(chunk)
                    return 200, None, b"".join(chunks)
        except httpcore.TimeoutException:
            raise InvalidRequest("image URL timed out", param=param) from None
        except (httpcore.ConnectError, httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
                OSError) as exc:
            raise InvalidRequest(f"could not fetch image URL ({type(exc).__name__})", param=param) from None
