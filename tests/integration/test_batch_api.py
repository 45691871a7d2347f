"""OpenAI's Files and Batch API end to end, with the official openai SDK as the client: files in a real S3-compatible
server (moto's server mode), batch records in the real PostgreSQL (beside the usage records), keys from a keys
file, jobs on Ray Data in the session's Ray cluster.

The app is the one-process layout with two ingress replicas and one BatchRunner; the job's stages are small actors
(a quarter CPU each) so that they fit beside the session's other apps. Every answer is checked against what the
online route answers for the same body.
"""

import base64
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import yaml

from tests.conftest import TINY_NAME, data_uri, encode, random_image
from tests.integration.test_api import assert_error
from tests.integration.test_scaling import wait_for

SECRETS = {name: f"sk-batch-{name}-5c2a" for name in ("owner", "other", "poor", "admin")}
APP = "batches"
BUCKET = "clip-batches"
LEASE_S = 3.0
TERMINAL = ("completed", "failed", "cancelled", "expired")
PRICE_PER_IMAGE_USD = 0.001


@pytest.fixture(scope="module")
def batch_url(serve_url, tiny_model_dir: Path, tmp_path_factory, postgres_server, s3_server):
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import AppArgs

    keys = tmp_path_factory.mktemp("batch-keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({
        "keys": [{"id": "key_owner", "secrets": [SECRETS["owner"]]},
                 {"id": "key_other", "secrets": [SECRETS["other"]]},
                 # two images' worth of credit at the batch price
                 {"id": "key_poor", "secrets": [SECRETS["poor"]], "credit_usd": PRICE_PER_IMAGE_USD}],
        "admin_keys": [{"id": "key_batch_admin", "secrets": [SECRETS["admin"]]}],
    }))
    s3_server.create_bucket(BUCKET)
    os.environ["CLIP_TEST_S3_URL"] = s3_server.url  # for stored_objects()
    # The session's Ray started before the S3 server's credentials were in the environment: the replicas get them
    # as a cluster's pods would (the Ray Data actors a runner starts inherit its runtime environment).
    aws = {**s3_server.DUMMY_CREDENTIALS, "AWS_EC2_METADATA_DISABLED": "true"}
    args = AppArgs.model_validate({
        "model": f"local-dir:{tiny_model_dir}", "served_model_name": TINY_NAME, "device": "cpu",
        "layout": "one-process", "torch_threads": 1,
        "encoder": {"num_replicas": 2, "num_cpus": 0.25, "env_vars": aws},
        "max_inputs_per_request": 64,
        "limits": {"max_body_bytes": 4_000_000},
        "tenancy": {"keys_file": str(keys), "database_url": postgres_server.url,
                    "price": {"usd_per_million_tokens": 1.0, "usd_per_thousand_images": PRICE_PER_IMAGE_USD * 2000}},
        "batch": {
            "enabled": True, "max_file_bytes": 3_000_000, "lease_s": LEASE_S, "poll_interval_s": 0.25,
            "sweep_interval_s": 1.0,
            "storage": s3_server.store_uri(BUCKET, "files"),
            "runner": {"num_replicas": 1, "num_cpus": 0.25, "env_vars": aws},
            "job": {"preprocess_concurrency": 1, "preprocess_cpus": 0.25, "encoder_cpus": 0.25, "batch_size": 16,
                    "preprocess_batch_size": 8, "niceness": 5},
        },
    })
    serve.run(build_app(args), name=APP, route_prefix="/" + APP, blocking=False)
    url = serve_url + "/" + APP
    wait_for(lambda: _live(url), 180, "the batches app")
    yield url
    serve.delete(APP)


def _live(url: str) -> bool:
    try:
        return requests.get(url + "/livez", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def sdk(url: str, key: str = "owner") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=SECRETS[key], max_retries=4, timeout=60)


def jsonl(lines: list) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode() + b"\n"


def line(custom_id: str, body: dict, url: str = "/v1/embeddings", method: str = "POST") -> dict:
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def image(seed: int, fmt: str = "PNG") -> str:
    mime = {"PNG": "image/png", "JPEG": "image/jpeg"}[fmt]
    return data_uri(encode(random_image(48 + seed % 7, 40 + seed % 5, seed=seed), fmt), mime)


def submit(client: openai.OpenAI, lines: list, **create) -> tuple[str, str]:
    uploaded = client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                  **create)
    return uploaded.id, batch.id


def finished(client: openai.OpenAI, batch_id: str, timeout_s: float = 240):
    holder = {}

    def done() -> bool:
        holder["batch"] = client.batches.retrieve(batch_id)
        return holder["batch"].status in TERMINAL

    wait_for(done, timeout_s, f"batch {batch_id} to finish")
    return holder["batch"]


def output_lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    rows = [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
    return {row["custom_id"]: row for row in rows}


def vectors(body: dict) -> np.ndarray:
    out = []
    for item in body["data"]:
        value = item["embedding"]
        out.append(np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str) else value)
    return np.asarray(out, dtype=np.float32)


def test_the_sdk_runs_a_batch_whose_every_answer_equals_the_online_route(batch_url):
    client = sdk(batch_url)
    bodies = {
        "caption": {"model": TINY_NAME, "input": "a photo of a cat"},
        "captions": {"model": TINY_NAME, "input": ["a dog", "two dogs on a beach at sunset", "ünïcödé ✓"]},
        "image": {"model": TINY_NAME, "input": [{"type": "image_url", "image_url": {"url": image(1)}}]},
        "mixed": {"model": TINY_NAME, "input": [{"type": "text", "text": "a red car"},
                                                {"type": "image_url", "image_url": {"url": image(2, "JPEG")}},
                                                {"type": "image_url", "image_url": image(3)}]},
        "base64": {"model": TINY_NAME, "input": ["encoded as base64"], "encoding_format": "base64"},
        "default-model": {"input": "no model named"},
    }
    for i in range(20):  # enough rows for several encoder batches
        bodies[f"more-{i}"] = {"model": TINY_NAME, "input": [f"caption number {i}", image(10 + i)]}
    file_id, batch_id = submit(client, [line(cid, body) for cid, body in bodies.items()],
                               metadata={"purpose": "test"})
    batch = finished(client, batch_id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == len(bodies) and batch.request_counts.completed == len(bodies)
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.metadata == {"purpose": "test"} and batch.model == TINY_NAME
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    answers = output_lines(client, batch.output_file_id)
    assert list(answers) == list(bodies)  # every line, in the file's order
    tokens = 0
    for custom_id, body in bodies.items():
        row = answers[custom_id]
        assert row["error"] is None and row["response"]["status_code"] == 200
        assert row["id"].startswith("batch_req_") and row["response"]["request_id"]
        online = requests.post(batch_url + "/v1/embeddings", json=body,
                               headers={"Authorization": f"Bearer {SECRETS['owner']}"}, timeout=60)
        assert online.status_code == 200, online.text
        expected, got = online.json(), row["response"]["body"]
        assert set(got) == set(expected) and got["object"] == "list" and got["model"] == expected["model"]
        assert got["usage"] == expected["usage"]
        assert [d["index"] for d in got["data"]] == [d["index"] for d in expected["data"]]
        a, b = vectors(got), vectors(expected)
        assert a.shape == b.shape
        cosines = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosines.min() >= 0.9999, (custom_id, cosines)
        tokens += expected["usage"]["prompt_tokens"]
    assert batch.usage.input_tokens == tokens
    output = client.files.retrieve(batch.output_file_id)
    assert output.purpose == "batch_output" and output.bytes > 0
    listed = {f.id: f.purpose for f in client.files.list()}
    assert listed[file_id] == "batch" and listed[batch.output_file_id] == "batch_output"
    assert batch_id in [b.id for b in client.batches.list(limit=100)]
    with pytest.raises(openai.BadRequestError):  # a completed batch cannot be cancelled
        client.batches.cancel(batch_id)


def test_format_errors_fail_the_batch_with_their_line_numbers(batch_url):
    client = sdk(batch_url)
    lines = [
        line("a", {"model": TINY_NAME, "input": "fine"}),
        '{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"input": "unterminated"',
        line("c", {"model": TINY_NAME, "input": "fine"}),
        line("c", {"model": TINY_NAME, "input": "the same custom_id again"}),
        line("d", {"model": TINY_NAME, "input": "x"}, url="/v1/chat/completions"),
        line("e", {"model": TINY_NAME, "input": "x"}, method="GET"),
        line("f", {"model": "another-model", "input": "x"}),
    ]
    _, batch_id = submit(client, lines)
    batch = finished(client, batch_id)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    found = {(e.code, e.line) for e in batch.errors.data}
    assert found == {("invalid_json_line", 2), ("duplicate_custom_id", 4), ("invalid_url", 5),
                     ("invalid_method", 6), ("mismatched_model", 7)}, batch.errors


def test_lines_the_online_route_refuses_fail_alone_and_the_others_complete(batch_url):
    client = sdk(batch_url)
    truncated = encode(random_image(64, 48, seed=5), "JPEG")
    bodies = {
        "good-1": {"model": TINY_NAME, "input": "a cat"},
        "bad-image": {"model": TINY_NAME, "input": [{"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64," + base64.b64encode(truncated[: len(truncated) // 2]).decode()}}]},
        "not-an-image": {"model": TINY_NAME, "input": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,AAAA"}}, "text"]},
        "bad-dimensions": {"model": TINY_NAME, "input": "x", "dimensions": 3},
        "empty-input": {"model": TINY_NAME, "input": []},
        "url-image": {"model": TINY_NAME, "input": [{"type": "image_url",
                                                     "image_url": {"url": "http://127.0.0.1:1/x.png"}}]},
        "good-2": {"model": TINY_NAME, "input": [{"type": "image_url", "image_url": {"url": image(7)}}]},
    }
    _, batch_id = submit(client, [line(cid, body) for cid, body in bodies.items()])
    batch = finished(client, batch_id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 5)
    assert set(output_lines(client, batch.output_file_id)) == {"good-1", "good-2"}
    errors = output_lines(client, batch.error_file_id)
    assert set(errors) == set(bodies) - {"good-1", "good-2"}
    for custom_id, row in errors.items():
        online = requests.post(batch_url + "/v1/embeddings", json=bodies[custom_id],
                               headers={"Authorization": f"Bearer {SECRETS['owner']}"}, timeout=60)
        assert row["response"]["status_code"] == online.status_code == 400, (custom_id, online.text)
        assert row["response"]["body"] == online.json(), custom_id  # the online route's own error, word for word
    # billed: the good lines, and the text beside the bad image (encoded before its line failed), as online
    def tokens(body: dict) -> int:
        answer = requests.post(batch_url + "/v1/embeddings", json=body,
                               headers={"Authorization": f"Bearer {SECRETS['owner']}"}, timeout=60)
        return answer.json()["usage"]["prompt_tokens"]

    assert batch.usage.input_tokens == tokens(bodies["good-1"]) + tokens({"model": TINY_NAME, "input": "text"})
    assert batch.usage.images == 1


SMALL_IMAGES = [data_uri(encode(random_image(16, 12, seed=200 + i)), "image/png") for i in range(20)]


def big_batch(count: int) -> list:
    """`count` lines of an image (small: a big file is not what is tested) and a caption each."""
    return [line(f"r{i}", {"model": TINY_NAME, "input": [{"type": "image_url", "image_url": SMALL_IMAGES[i % 20]},
                                                         f"caption {i}"]}) for i in range(count)]


def test_cancel_stops_the_work_and_keeps_what_was_done_and_no_other_key_can_touch_it(batch_url):
    owner, other = sdk(batch_url), sdk(batch_url, "other")
    file_id, batch_id = submit(owner, big_batch(1500))
    wait_for(lambda: owner.batches.retrieve(batch_id).request_counts.completed > 0, 180, "some lines done")
    # another key: the batch and its file do not exist for it
    for call in (lambda: other.batches.retrieve(batch_id), lambda: other.batches.cancel(batch_id),
                 lambda: other.files.retrieve(file_id), lambda: other.files.content(file_id),
                 lambda: other.files.delete(file_id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch_id not in [b.id for b in other.batches.list()]
    cancelling = owner.batches.cancel(batch_id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    started = time.monotonic()
    batch = finished(owner, batch_id, timeout_s=30)
    assert batch.status == "cancelled" and time.monotonic() - started < 30
    done = batch.request_counts.completed
    assert 0 < done < 1500
    assert len(output_lines(owner, batch.output_file_id)) == done  # the partial results are kept
    assert batch.usage.input_tokens > 0
    assert owner.batches.cancel(batch_id).status == "cancelled"  # cancelling again answers the batch as it is


def replica_pids(deployment: str) -> list[int]:
    """The pids of a deployment's replicas of this app, asked of each replica actor (by its name in the GCS)."""
    import ray
    from ray.exceptions import RayActorError

    pids = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#"):
            try:  # a replica killed a moment ago may still hold its name: not a live replica
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                pids.append(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=30))
            except (RayActorError, ValueError):
                continue
    return pids


def test_a_batch_survives_its_ingress_replicas_being_killed(batch_url):
    client = sdk(batch_url)
    _, batch_id = submit(client, big_batch(200))
    wait_for(lambda: client.batches.retrieve(batch_id).status == "in_progress", 120, "the batch running")
    ingresses = replica_pids("OpenAIIngress")
    assert len(ingresses) == 2
    for pid in ingresses:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _live(batch_url), 120, "new ingress replicas")
    batch = finished(client, batch_id)
    assert batch.status == "completed" and batch.request_counts.completed == 200, batch
    assert len(output_lines(client, batch.output_file_id)) == 200


def test_a_batch_whose_runner_dies_is_run_again_by_the_next_runner(batch_url):
    client = sdk(batch_url)
    _, batch_id = submit(client, big_batch(300))
    wait_for(lambda: client.batches.retrieve(batch_id).request_counts.completed > 0, 180, "the batch running")
    (old_pid,) = replica_pids("BatchRunner")
    os.kill(old_pid, signal.SIGKILL)
    batch = finished(client, batch_id, timeout_s=300)
    assert batch.status == "completed" and batch.request_counts.completed == 300, batch.model_dump()
    answers = output_lines(client, batch.output_file_id)
    assert sorted(answers) == sorted(f"r{i}" for i in range(300))  # once each: the second run wrote it all
    # Serve replaced the runner (the dead one's name may linger a moment)
    wait_for(lambda: (pids := replica_pids("BatchRunner")) and old_pid not in pids, 60, "a new runner replica")


def test_a_batch_beyond_the_keys_credit_fails_before_any_work(batch_url):
    poor = sdk(batch_url, "poor")
    _, batch_id = submit(poor, [line(f"i{i}", {"model": TINY_NAME, "input": [image(i)], "modality": "image"})
                                for i in range(10)])
    batch = finished(poor, batch_id)
    assert batch.status == "failed" and batch.errors.data[0].code == "insufficient_quota", batch
    assert batch.request_counts.completed == 0


def stored_objects() -> set[str]:
    import boto3

    from tests.services import MotoServer

    endpoint = os.environ["CLIP_TEST_S3_URL"]
    client = boto3.client("s3", endpoint_url=endpoint, region_name=MotoServer.region,
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="files/files/")
    # pyarrow may leave a directory marker (`…/`) where it deleted the last object under a prefix
    return {o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")}


def test_files_api_refusals(batch_url):
    client = sdk(batch_url)
    headers = {"Authorization": f"Bearer {SECRETS['owner']}"}
    wrong = requests.post(batch_url + "/v1/files", files={"file": ("a.txt", b"{}\n")}, data={"purpose": "batch"},
                          headers=headers, timeout=30)
    assert_error(wrong, 400, "file")
    purpose = requests.post(batch_url + "/v1/files", files={"file": ("a.jsonl", b"{}\n")},
                            data={"purpose": "fine-tune"}, headers=headers, timeout=30)
    assert_error(purpose, 400, "purpose")
    too_big = requests.post(batch_url + "/v1/files", files={"file": ("a.jsonl", b"x" * 3_100_000)},
                            data={"purpose": "batch"}, headers=headers, timeout=60)
    assert too_big.status_code == 413, too_big.text
    # just over the file limit, within the multipart framing's allowance: refused while copied, and no object left
    before = stored_objects()
    over = requests.post(batch_url + "/v1/files", files={"file": ("a.jsonl", b"x" * 3_000_100)},
                         data={"purpose": "batch"}, headers=headers, timeout=60)
    assert_error(over, 413, "file")
    assert stored_objects() == before
    not_multipart = requests.post(batch_url + "/v1/files", json={"purpose": "batch"}, headers=headers, timeout=30)
    assert not_multipart.status_code == 400
    unknown = requests.post(batch_url + "/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/embeddings",
                                                             "completion_window": "24h"}, headers=headers, timeout=30)
    assert_error(unknown, 404, "input_file_id")
    uploaded = client.files.create(file=("x.jsonl", jsonl([line("a", {"input": "x"})])), purpose="batch")
    window = requests.post(batch_url + "/v1/batches", json={"input_file_id": uploaded.id, "endpoint": "/v1/embeddings",
                                                            "completion_window": "1h"}, headers=headers, timeout=30)
    assert_error(window, 400, "completion_window")
    endpoint = requests.post(batch_url + "/v1/batches", json={"input_file_id": uploaded.id,
                                                              "endpoint": "/v1/completions",
                                                              "completion_window": "24h"}, headers=headers, timeout=30)
    assert_error(endpoint, 400, "endpoint")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    no_key = requests.get(batch_url + "/v1/batches", timeout=30)
    assert no_key.status_code == 401


def test_files_past_their_retention_are_deleted(batch_url, postgres_server, s3_server):
    """The runner's sweep: the object first, then its row."""
    import asyncio

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    client = sdk(batch_url)
    kept = client.files.create(file=("kept.jsonl", jsonl([line("a", {"input": "x"})])), purpose="batch")
    gone = client.files.create(file=("gone.jsonl", jsonl([line("a", {"input": "x"})])), purpose="batch")

    async def age() -> None:
        engine = create_async_engine(postgres_server.url)
        async with engine.begin() as conn:
            await conn.execute(sa.text("UPDATE batch_files SET expires_at = 0 WHERE id = :id"), {"id": gone.id})
        await engine.dispose()

    asyncio.run(age())
    from serve_app.batch.store import FileStore

    store = FileStore(s3_server.store_uri(BUCKET, "files"))
    assert store.size(f"files/{gone.id}") > 0

    def swept() -> bool:
        try:
            client.files.retrieve(gone.id)
            return False
        except openai.NotFoundError:
            return True

    # the row goes first (no download starts after it), then the object
    wait_for(lambda: swept() and store.size(f"files/{gone.id}") == 0, 90, "the retention sweep")
    assert client.files.retrieve(kept.id).id == kept.id


def test_the_batch_api_is_off_unless_enabled(serve_url):
    response = requests.get(serve_url + "/v1/batches", timeout=30)
    assert_error(response, 404)
    assert "batch.enabled" in response.json()["error"]["message"]
