"""`clip-haproxy` (serve_app/haproxy.py): HAProxy with Ray Serve's options passes every client's close on.

No Ray here: Ray's bundled HAProxy between a raw client and a plain backend, with the options that matter
from the config Ray Serve writes (ray/serve/_private/haproxy_templates.py: `abortonclose`, `splice-request`,
`splice-response`, `http-reuse always`, `idle-close-on-response`). The client sends its headers and body
in two writes, as HTTP clients do (requests, httpx, the openai SDK), and closes before the answer; the
backend must see the connection end. With splice on, HAProxy 2.8 often keeps such a connection half-open
until the backend answers.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serve_app.haproxy import NO_SPLICE
from serve_app.ray_env import free_port, haproxy_env

WRAPPER = Path(sys.executable).parent / "clip-haproxy"
BODY = json.dumps({"input": [f"gone {j}" for j in range(6)]}).encode()


class _Holding(BaseHTTPRequestHandler):
    """Answers health checks; holds every POST without answering and records whether its connection ended
    (EOF or reset) within the server's `hold_s`."""

    protocol_version = "HTTP/1.1"  # HAProxy keeps connections to it open

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # HAProxy's health checks
        self.send_response(200)
        self.send_header("Content-Length", "7")
        self.end_headers()
        self.wfile.write(b"success")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.release()
        self.connection.settimeout(self.server.hold_s)
        try:
            ended = self.connection.recv(1) == b""
        except TimeoutError:
            ended = False
        except ConnectionResetError:  # how HAProxy ends a connection that a client gave up
            ended = True
        self.server.outcomes.append("seen" if ended else "missed")
        self.close_connection = True


class Backend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hold_s: float = 3.0) -> None:
        super().__init__(("127.0.0.1", free_port()), _Holding)
        self.port = self.server_address[1]
        self.hold_s = hold_s
        self.outcomes: list[str] = []
        self.received = threading.Semaphore(0)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address) -> None:  # HAProxy ends its health checks with a reset
        pass

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def ray_like_config(frontend_port: int, backend_port: int) -> str:
    return f"""global
    maxconn 4096
    nbthread 4
    tune.bufsize 16384
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout http-keep-alive 90s
    option abortonclose
    option splice-request
    option splice-response
    option http-no-delay
    option idle-close-on-response
frontend http_frontend
    bind 127.0.0.1:{frontend_port}
    default_backend replicas
backend replicas
    http-reuse always
    option httpchk GET /-/healthz
    http-check expect status 200
    default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
    server replica 127.0.0.1:{backend_port} check
"""


def leave_early(port: int, backend: Backend) -> None:
    """A client that sends a request (headers, then body), gives up on the answer and closes."""
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(BODY))
        time.sleep(0.01)
        client.sendall(BODY)
        assert backend.received.acquire(timeout=10), "the request did not reach the backend"
        time.sleep(0.8)


@pytest.fixture
def haproxy_through_wrapper(tmp_path):
    backend = Backend()
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(ray_like_config(port, backend.port))
    proc = subprocess.Popen([str(WRAPPER), "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, **haproxy_env()})
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "HAProxy did not listen"
                time.sleep(0.1)
        time.sleep(0.6)  # the backend's first health checks pass (rise 2, fastinter 250 ms)
        yield port, backend, proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        backend.close()


def test_the_wrapper_runs_haproxy_without_splice(haproxy_through_wrapper):
    _, _, proc = haproxy_through_wrapper
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert Path(cmdline[0].decode()).name == "haproxy" and NO_SPLICE.encode() in cmdline  # exec'd in place


def test_every_client_that_leaves_is_seen_by_the_backend(haproxy_through_wrapper):
    port, backend, _ = haproxy_through_wrapper
    for _ in range(8):
        leave_early(port, backend)
    deadline = time.monotonic() + backend.hold_s + 5
    while len(backend.outcomes) < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backend.outcomes == ["seen"] * 8


def test_the_serving_env_starts_haproxy_through_the_wrapper():
    assert haproxy_env() == {"RAY_SERVE_HAPROXY_BINARY_PATH": str(WRAPPER)}
    assert os.access(WRAPPER, os.X_OK)
