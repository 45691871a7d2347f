"""Shared fixtures: tiny random open_clip models the tests write themselves, a live Ray Serve app, and real Redis
and PostgreSQL servers and an S3-compatible object store (tests/services.py).

No test downloads weights. The Serve app runs on a local Ray instance on a free loopback port and is
shut down at the end of the session; so are the Redis, PostgreSQL and S3 servers, started only for tests that ask.
"""

import base64
import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_app.processes import signal_session
from serve_app.dev_model import write_tiny_model
from serve_app.ray_env import free_port, use_one_machine_env
from tests.services import MotoServer, PostgresServer, RedisServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The tests serve the way production does (deploy/ray-serve.env: Ray Serve's throughput mode behind
# HAProxy). Set before Ray is imported anywhere: Ray reads them at import. Any of them set outside wins.
# Production drains a removed ingress replica for 30 s so load balancers can let go of it; tests that delete
# an app and shut Serve down would wait for that each time (ONE_MACHINE_ENV).
use_one_machine_env()

TINY_NAME = "tiny-clip"
SECOND_NAME = "tiny-clip-b"
# A second architecture with its own embedding size and preprocessing, for the several-models case.
SECOND_MODEL_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 40, "layers": 1, "width": 48, "head_width": 24, "patch_size": 10},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 1},
}
SECOND_PREPROCESS_CFG = {"mean": [0.45, 0.45, 0.45], "std": [0.27, 0.26, 0.28], "interpolation": "bicubic",
                         "resize_mode": "squash"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-clip", seed=0)


@pytest.fixture(scope="session")
def second_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-clip-b", seed=1,
                            model_cfg=SECOND_MODEL_CFG, preprocess_cfg=SECOND_PREPROCESS_CFG)


def open_clip_reference(directory: Path):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{directory}")


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path):
    """open_clip itself: (model, preprocess, tokenizer) for the tiny model, the ground truth of every test."""
    return open_clip_reference(tiny_model_dir)


@pytest.fixture(scope="session")
def second_reference(second_model_dir: Path):
    return open_clip_reference(second_model_dir)


def app_args(tiny_model_dir: Path, second_model_dir: Path) -> dict:
    """The session app's `build_app` args (tests that reconfigure it restore these)."""
    small_pool = {"num_replicas": 1, "num_cpus": 0.5, "num_gpus": 0, "max_ongoing_requests": 128}
    batching = {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "text_max_batch_size": 16}
    args = {
        "models": [
            {"model": f"local-dir:{tiny_model_dir}", "served_model_name": TINY_NAME, "torch_threads": 1,
             "batching": batching, "encoder": small_pool},
            {"model": f"local-dir:{second_model_dir}", "served_model_name": SECOND_NAME, "torch_threads": 1,
             "batching": batching, "encoder": small_pool},
        ],
        "max_inputs_per_request": 64,
        "zero_shot": {"max_labels": 50, "max_templates": 100, "label_cache_size": 1000},
        "image_limits": {"max_image_pixels": 4_000_000, "max_image_bytes": 2_000_000},
        # small request limits, so that tests/integration/test_hostile_inputs.py can reach each one cheaply
        "limits": {"max_body_bytes": 4_000_000, "body_read_timeout_s": 3.0, "max_text_chars": 1000, "max_request_text_chars": 20_000,
                   "max_template_chars": 100, "max_prompts_per_request": 2000,
                   "max_request_image_pixels": 6_000_000, "max_request_image_bytes": 2_500_000},
        "preprocessor": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 64},
        "ingress": {"num_replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 256},
    }
    return args


def deploy_config(args: dict, deployments: list[dict] | None = None) -> None:
    """Deploys `args` the way `serve run config.yaml` and KubeRay do: a Serve config naming build_app.

    (Not `serve.run(app)`: only config deploys give the stable code version that lets a user_config change
    reconfigure replicas in place.) Blocks until the application is running.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    application = {"name": "clip", "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": args}
    if deployments:
        application["deployments"] = deployments
    config = {"applications": [application]}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)


def driver_handle(deployment: str, app_name: str = "clip"):
    """A handle the test process can call synchronously (`.remote().result()`).

    In Ray Serve's throughput mode a handle's router runs on the caller's event loop, which plain test code
    does not have; this handle keeps Ray's own router loop instead. (The replicas are unaffected.)
    """
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    if handle._router is None:  # Serve hands out one handle per deployment; a second test reuses it as set up
        handle._init(_run_router_in_separate_loop=True)
    return handle


# Ray's Prometheus endpoint of the session's Ray instance (its metrics agent), for the metrics tests.
METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def serve_url(tiny_model_dir: Path, second_model_dir: Path) -> Iterator[str]:
    """A running app (ingress + preprocessor + one encoder per model) serving two tiny models."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=METRICS_PORT)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy_config(app_args(tiny_model_dir, second_model_dir))
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        # This session's Ray started every HAProxy of this process's session (`serve run` tests get sessions
        # of their own). Ray Serve reloads HAProxy by starting a new process; one was once left running
        # after a whole-suite run, holding its ports.
        signal_session(os.getsid(0), signal.SIGKILL, name="haproxy")


# ------------------------------------------------------------------ Redis and PostgreSQL


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server of this session (no persistence): `.url`, `.port`, `.pid`, `.stop()`, `.start()`.
    A test that stops it starts it again (same port, empty); keys are shared with the session's other tests."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL of this session: `.url` (SQLAlchemy async, role and database `clip`), `.port`, `.pid`,
    `.stop()`, `.start()`, `.restart()` (same port, same data). Tables are shared with the session's other tests."""
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real S3-compatible server of this session (moto's server mode, in memory): `.endpoint` (host:port),
    `.url`, `.pid`, `.stop()`, `.start()`, `.create_bucket()`, `.store_uri(bucket, prefix)`, `.client()`.

    Its dummy AWS credentials and region are set in os.environ for the session (and put back after it), so
    that pyarrow's S3 filesystem, boto3 and Ray workers started later find them."""
    names = (*MotoServer.DUMMY_CREDENTIALS, "AWS_EC2_METADATA_DISABLED")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(MotoServer.DUMMY_CREDENTIALS)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # no instance-metadata lookups for credentials or region
    try:
        with MotoServer(tmp_path_factory.mktemp("moto")) as server:
            yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ------------------------------------------------------------------ image helpers


def random_image(width: int = 120, height: int = 90, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.RandomState(seed)
    image = Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"
