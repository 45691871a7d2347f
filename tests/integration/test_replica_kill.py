"""An encoder replica killed with SIGKILL under steady load: Serve replaces it, the service answers again
within 30 s, a client that retries 429/503 as Retry-After says loses no request, and /health tells the truth
(503 while no encoder answers, 200 after). Against the session app's tiny-clip encoder pool."""

import os
import signal
import threading
import time

import requests

from tests.conftest import TINY_NAME, driver_handle

RECOVERY_S = 30.0


def retrying_post(url: str, body: dict, give_up_s: float = 90.0) -> tuple[int, int]:
    """(final status, retries): retries 429 and 503 after the Retry-After they carry, as a careful client does."""
    deadline = time.monotonic() + give_up_s
    retries = 0
    while True:
        response = requests.post(url + "/v1/embeddings", json=body, timeout=60)
        if response.status_code not in (429, 503) or time.monotonic() > deadline:
            return response.status_code, retries
        assert response.json()["error"]["code"] == response.status_code  # OpenAI's shape, even now
        retries += 1
        time.sleep(float(response.headers.get("Retry-After", "1")))


def test_sigkill_of_an_encoder_replica_under_load_loses_no_request(serve_url):
    handle = driver_handle(f"ClipEncoder-{TINY_NAME}")
    old_pid = handle.info.remote().result(timeout_s=30)["pid"]
    results: list[tuple[int, int, float]] = []  # (status, retries, finished at)
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            status, retries = retrying_post(serve_url, {"model": TINY_NAME, "input": [f"client {n} request {i}"]})
            results.append((status, retries, time.monotonic()))
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    health: list[tuple[float, int, bool]] = []
    try:
        time.sleep(3)
        assert results and all(status == 200 for status, _, _ in results)
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        recovered_at = None
        while time.monotonic() - killed_at < RECOVERY_S + 15:
            response = requests.get(serve_url + "/health", timeout=30)
            report = response.json()["models"][TINY_NAME]
            health.append((time.monotonic() - killed_at, response.status_code, report["ok"]))
            assert (response.status_code == 200) == (response.json()["status"] == "ok")
            if response.status_code == 200 and any(t > killed_at + 0.5 and s == 200 for s, _, t in results):
                recovered_at = time.monotonic()
                break
            time.sleep(0.5)
        assert recovered_at is not None and recovered_at - killed_at < RECOVERY_S, health
        time.sleep(3)  # steady load after recovery
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    statuses = [status for status, _, _ in results]
    assert statuses and set(statuses) == {200}, statuses  # no request lost
    new_pid = handle.info.remote().result(timeout_s=30)["pid"]
    assert new_pid != old_pid  # Serve replaced the replica
    assert requests.get(serve_url + "/health", timeout=30).status_code == 200
