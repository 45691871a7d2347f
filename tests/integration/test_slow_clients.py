"""Slow and stuck clients cannot hold the service: a client that trickles its body gets 408 once the
session app's `body_read_timeout_s` (3 s) has passed, and one that trickles its headers waits in HAProxy
(which forwards only complete headers); normal requests keep succeeding meanwhile."""

import socket
import threading
import time
from urllib.parse import urlsplit

import requests

from tests.conftest import TINY_NAME


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=30)


def _trickle_body(url: str, results: list, index: int) -> None:
    start = time.monotonic()
    with _connect(url) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        answer = b""
        try:
            for _ in range(60):  # one byte a second, far slower than the 3 s budget allows
                sock.sendall(b" ")
                sock.settimeout(1.0)
                try:
                    chunk = sock.recv(4096)
                    if chunk:
                        answer += chunk
                        break
                    break
                except socket.timeout:
                    continue
        except OSError:
            pass
        results[index] = (answer.split(b"\r\n", 1)[0], time.monotonic() - start)


def _trickle_headers(url: str, stop: threading.Event) -> None:
    with _connect(url) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\n")
        while not stop.wait(1.0):
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                return


def test_slow_clients_do_not_hold_the_service(serve_url):
    stop = threading.Event()
    header_threads = [threading.Thread(target=_trickle_headers, args=(serve_url, stop)) for _ in range(5)]
    body_results: list = [None] * 5
    body_threads = [threading.Thread(target=_trickle_body, args=(serve_url, body_results, i)) for i in range(5)]
    for thread in header_threads + body_threads:
        thread.start()
    try:
        time.sleep(0.5)
        for i in range(10):  # normal requests meanwhile
            response = requests.post(serve_url + "/v1/embeddings", json={"model": TINY_NAME, "input": [f"t{i}"]},
                                     timeout=30)
            assert response.status_code == 200, response.text
        for thread in body_threads:
            thread.join(timeout=60)
        for status_line, elapsed in body_results:
            assert b" 408 " in status_line + b" ", status_line
            assert elapsed < 10, elapsed
    finally:
        stop.set()
        for thread in header_threads:
            thread.join(timeout=10)
