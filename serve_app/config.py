"""Configuration enters once: the YAML/CLI `args` of `build_app`, validated by these models.

Per-pool settings (replicas or Ray's `autoscaling_config`, CPUs, GPUs, queue bounds and back-pressure) sit in
one `PoolSettings` per deployment, merged over that pool's defaults (`POOL_DEFAULTS`, `AUTOSCALING_DEFAULTS`), so
that a pool can be tuned without touching code.
"""

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DEFAULT_MODEL = "hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K"
QUEUE_DEPTH_POLICY = "serve_app.autoscaling:QueueDepthPolicy"  # serve_app/autoscaling.py

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Layout = Literal["pools", "one-process"]
Device = Literal["auto", "cpu", "cuda"]
CpuKernels = Literal["onednn", "eager"]
ImageDecode = Literal["exact", "fast"]


class StrictModel(BaseModel):
    """Configuration typos are errors: an unknown key fails at `serve run`, not silently at 3 a.m."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PoolSettings(StrictModel):
    """Ray Serve options of one deployment (a pool of replicas)."""

    num_replicas: int | Literal["auto"] | None = None
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = Field(
        default=None, description="calls waiting at the callers' handles beyond which Ray rejects new ones (-1: no bound)"
    )
    backpressure_config: dict[str, Any] | None = Field(
        default=None, description="Ray's answer to a rejected call: {status_code: 429|503, retry_after_s}"
    )
    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = Field(default=None, description="bytes reserved per replica (Ray resource)")
    env_vars: dict[str, str] | None = Field(default=None, description="environment of each replica process")

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`, leaving Ray's defaults where unset."""
        options: dict[str, Any] = {}
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config
        if self.num_replicas is not None:
            options["num_replicas"] = self.num_replicas
        for key in ("max_ongoing_requests", "max_queued_requests", "backpressure_config"):
            value = getattr(self, key)
            if value is not None:
                options[key] = value
        actor: dict[str, Any] = {
            k: v for k, v in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus), ("memory", self.memory))
            if v is not None
        }
        if self.env_vars:
            actor["runtime_env"] = {"env_vars": dict(self.env_vars)}
        if actor:
            options["ray_actor_options"] = actor
        return options

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> "PoolSettings":
        if self.autoscaling_config is not None and self.num_replicas not in (None, "auto"):
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self


class BatchSettings(StrictModel):
    """Dynamic batching of one encoder; changeable at run time through `user_config`. These are the only
    defaults: the encoder's `@serve.batch` decorators and every config start from them.

    No wait by default, on CPUs and GPUs alike: while a forward pass runs the encoder holds new calls back and
    lets them in together (serve_app/pass_gate.py), so batches fill under load without a wait, and an idle
    encoder starts at once; a wait would only add latency (BENCHMARKS.md, "Batch wait 0 against 2 ms, on one
    server").
    """

    max_batch_size: int = Field(default=32, ge=1, le=4096, description="images per forward pass")
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    text_max_batch_size: int = Field(default=64, ge=1, le=4096, description="texts per forward pass")
    text_batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    # After a pass, wait for the callers it answered to come back (closed-loop clients) for at most this
    # fraction of the pass's duration, and no longer once arrivals pause for `refill_gap_s`; 0 turns it off.
    # Only when the pass answered at least twice the rows that arrived during it (serve_app/pass_gate.py).
    refill_wait_fraction: float = Field(default=0.5, ge=0.0, le=4.0)
    refill_gap_s: float = Field(default=0.01, ge=0.0, le=10.0)
    # The ingress's side (serve_app/coalescing.py), read when it starts: while this many calls of a modality are
    # in flight to this model's encoder, more requests' rows wait there and go together in the next call (at most
    # `text_max_batch_size` rows); 0 (the default): every request is its own call. Off by default: rows waiting
    # in the ingress are not counted by the encoder pool's `max_queued_requests` (which counts calls), so with it
    # on an overloaded pool answers late (the deadline's 504) instead of refusing at once (429).
    ingress_calls_in_flight: int = Field(default=0, ge=0, le=1024)


# Each pool's defaults, in one place. A user's pool settings are merged over these key by key
# (`merge_pool`): `preprocessor: {num_replicas: 4}` keeps the pool's `max_ongoing_requests` and CPUs.
# - `max_ongoing_requests` counts whole requests: it must let enough of them reach a replica for its batches to
#   fill (Ray's own default, 5, would cap a `@serve.batch` queue at 5 calls).
# - `max_queued_requests` bounds the calls waiting at the callers' handles once every replica holds
#   `max_ongoing_requests`; beyond it Ray rejects at once, and the client gets 429 with `Retry-After`
#   (`backpressure_config`) instead of a queue that grows without limit.
_REJECT_WITH_429 = {"status_code": 429, "retry_after_s": 1}
POOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 256,
                "backpressure_config": _REJECT_WITH_429, "num_cpus": 1},
    "preprocessor": {"num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": 256,
                     "backpressure_config": _REJECT_WITH_429, "num_cpus": 0.5},
    "ingress": {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 512,
                "backpressure_config": _REJECT_WITH_429, "num_cpus": 0.25},
}

# What a pool's `autoscaling_config` (or `num_replicas: auto`) starts from; the user's keys win. Ray's own
# defaults fill the rest (min_replicas 1, max_replicas 1 unless set).
# - encoder: the queue-depth policy (serve_app/autoscaling.py) on the work waiting in full batches; replicas
#   report every 2 s and Ray averages over 6 s; it adds capacity after 5 s of backlog and removes it after
#   60 s without (a GPU replica takes long to load, so it is not given back at the first lull).
# - preprocessor and ingress: Ray's request-count policy. A preprocessing replica decodes a few images at a
#   time (its CPUs), so a handful of requests in flight each is its working point; the ingress only parses
#   and awaits, so it carries many.
AUTOSCALING_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {
        "policy": {"policy_function": QUEUE_DEPTH_POLICY,
                   "policy_kwargs": {"target_fill": 1.0, "hysteresis": 0.25}},
        "metrics_interval_s": 2.0, "look_back_period_s": 6.0, "upscale_delay_s": 5.0, "downscale_delay_s": 60.0,
    },
    "preprocessor": {"target_ongoing_requests": 4, "metrics_interval_s": 2.0, "look_back_period_s": 6.0,
                     "upscale_delay_s": 5.0, "downscale_delay_s": 60.0},
    "ingress": {"target_ongoing_requests": 64, "metrics_interval_s": 2.0, "look_back_period_s": 6.0,
                "upscale_delay_s": 5.0, "downscale_delay_s": 60.0},
}


def merge_pool(pool: str, user: Any) -> Any:
    """The user's keys of one pool over its defaults, `backpressure_config` and `autoscaling_config` merged one
    level deeper. A replica count and an autoscaling config exclude each other: whichever the user sets
    replaces the other default. A user's `policy` without `policy_function` tunes the default policy's kwargs;
    with one, it replaces the default policy (Ray's own: `ray.serve.autoscaling_policy:default_autoscaling_policy`)."""
    if user is None:
        user = {}
    elif isinstance(user, PoolSettings):
        user = user.model_dump(exclude_unset=True)
    elif not isinstance(user, dict):
        return user  # not a mapping: validation says what is wrong with it
    merged = dict(POOL_DEFAULTS[pool])
    autoscaling = user.get("autoscaling_config")
    if autoscaling is not None or user.get("num_replicas") == "auto":
        merged.pop("num_replicas", None)
        if isinstance(autoscaling, dict) or autoscaling is None:
            user = {**user, "autoscaling_config": _merge_autoscaling(pool, autoscaling or {})}
    if isinstance(user.get("backpressure_config"), dict):
        user = {**user, "backpressure_config": {**merged["backpressure_config"], **user["backpressure_config"]}}
    merged.update(user)
    return merged


def _merge_autoscaling(pool: str, user: dict[str, Any]) -> dict[str, Any]:
    defaults = AUTOSCALING_DEFAULTS[pool]
    policy = user.get("policy")
    replaces_policy = isinstance(policy, dict) and "policy_function" in policy
    if "policy" in defaults and "target_ongoing_requests" in user and not replaces_policy:
        # The queue-depth policy never reads it: a setting that would be silently ignored is refused.
        raise ValueError(
            f"{pool}.autoscaling_config.target_ongoing_requests is not read by this pool's queue-depth policy "
            f"({QUEUE_DEPTH_POLICY}); tune it with autoscaling_config.policy.policy_kwargs.target_fill (rows "
            "waiting per replica, in full batches) and .hysteresis, or set autoscaling_config.policy.policy_function "
            "to ray.serve.autoscaling_policy:default_autoscaling_policy to scale on request counts"
        )
    merged = {**defaults, **user}
    if "policy" in defaults and isinstance(policy, dict) and "policy_function" not in policy:
        default_policy = defaults["policy"]
        merged["policy"] = {
            **default_policy, **policy,
            "policy_kwargs": {**default_policy["policy_kwargs"], **(policy.get("policy_kwargs") or {})},
        }
    return merged


class ModelSpec(StrictModel):
    """One served model: where its weights come from, how it runs, and its own encoder pool."""

    model: str = Field(default=DEFAULT_MODEL, description="open_clip id: hf-hub:org/repo, local-dir:/path or a name")
    pretrained: str | None = Field(default=None, description="pretrained tag, for built-in names only")
    served_model_name: str | None = Field(default=None, description="what clients send as `model`")
    device: Device = "auto"
    precision: Precision = "auto"
    torch_threads: int | None = Field(default=None, ge=1, description="intra-op CPU threads of an encoder")
    cpu_kernels: CpuKernels = Field(
        default="onednn",
        description="fp32 on the CPU: onednn runs the transformer's linear layers on weights packed once at load "
        "(serve_app/cpu_kernels.py); eager leaves open_clip's modules as they are",
    )
    image_decode: ImageDecode = Field(
        default="exact",
        description="exact: open_clip's transform on the fully decoded image; fast: JPEGs decoded by libjpeg at a "
        "reduced scale (no less than twice the input size), then the same transform (README.md, Configuration; "
        "BENCHMARKS.md, Preprocessing per core)",
    )
    batching: BatchSettings = Field(default_factory=BatchSettings)
    encoder: PoolSettings = Field(default_factory=lambda: PoolSettings(**POOL_DEFAULTS["encoder"]))
    health_max_age_s: float = Field(default=30.0, gt=0, description="/health probes an encoder idle longer")

    @field_validator("encoder", mode="before")
    @classmethod
    def _encoder_defaults(cls, encoder: Any) -> Any:
        return merge_pool("encoder", encoder)

    @field_validator("model")
    @classmethod
    def _absolute_local_dir(cls, model: str) -> str:
        """Replicas may run in another working directory: pin `local-dir:` paths where the app is built."""
        if model.startswith("local-dir:"):
            return "local-dir:" + str(Path(model[len("local-dir:"):]).expanduser().resolve())
        return model

    @property
    def encoder_options(self) -> dict[str, Any]:
        """Ray options of this model's encoder pool, with its GPUs resolved from the device."""
        options = self.encoder.deployment_options()
        options.setdefault("ray_actor_options", {})["num_gpus"] = self.encoder_gpus
        return options

    @property
    def encoder_gpus(self) -> float:
        """GPUs per encoder replica: as configured, else 1 for device=cuda and 0 otherwise."""
        if self.encoder.num_gpus is not None:
            return self.encoder.num_gpus
        return 1 if self.device == "cuda" else 0

    @model_validator(mode="after")
    def _cuda_needs_a_gpu(self) -> "ModelSpec":
        if self.device == "cuda" and self.encoder.num_gpus == 0:
            raise ValueError("device=cuda with encoder.num_gpus=0: Ray would give the replica no GPU")
        return self

    @property
    def name(self) -> str:
        """The served name: explicit, else the hub repo id, the directory name, or name/tag."""
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith("hf-hub:"):
            return self.model[len("hf-hub:"):]
        if self.model.startswith("local-dir:"):
            return self.model.rstrip("/").rsplit("/", 1)[-1]
        return f"{self.model}/{self.pretrained}" if self.pretrained else self.model

    @property
    def slug(self) -> str:
        """A deployment-name-safe form of the served name."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")


class ImageLimits(StrictModel):
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="width*height cap, checked before decoding")
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="encoded size cap per image")
    max_jpeg_scans: int = Field(
        default=64, ge=1,
        description="scans of one JPEG, counted from its segments before decoding: each costs a pass over the "
        "whole image (a progressive JPEG has about 10; a crafted one repeats a scan thousands of times)",
    )


class ZeroShotSettings(StrictModel):
    max_labels: int = Field(default=4096, ge=1, description="labels per /v1/classify request")
    max_templates: int = Field(default=128, ge=1, description="prompt templates per request")
    label_cache_size: int = Field(
        default=20_000, ge=0, description="classifier vectors kept per ingress replica (LRU; 0 disables)"
    )


class RequestLimits(StrictModel):
    """Per-request limits, each checked before the work it protects; each breach is a 4xx in OpenAI's error
    shape that names the offending `param`. The older caps stay where they were: `max_inputs_per_request`
    (items), `image_limits` (per image) and `zero_shot` (labels, templates)."""

    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024,
        description="request body size: 413 from Content-Length before reading, or once a chunked body passes it",
    )
    max_json_values: int = Field(
        default=262_144, ge=1024,
        description="commas, braces and brackets of one request body, counted as it arrives (an upper bound of "
        "its JSON values, checked before parsing): ordinary requests hold a few per item, and every character of "
        "their texts counts at most once",
    )
    max_requests_in_flight: int | None = Field(
        default=None, ge=1,
        description="requests one ingress replica works on at once; past it a request gets 429 in OpenAI's shape "
        "with Retry-After at once (null: 3/4 of the ingress pool's max_ongoing_requests, so that Ray's own "
        "queue bound, which answers in plain text, is only a backstop)",
    )
    body_read_timeout_s: float = Field(
        default=30.0, gt=0,
        description="seconds from the request's start until its whole body has arrived; a client that trickles "
        "its body past it gets 408 and frees its ingress slot",
    )
    max_text_chars: int = Field(
        default=16_000, ge=1,
        description="characters per text input, label and rerank query/document (400 past it). A text is embedded "
        "as open_clip embeds it (its first 77 tokens); tokenizing stops once those are found, and long words are "
        "merged in O(n log n) (serve_app/tokenizing.py), so a long text costs its cleaning, linear in its length",
    )
    max_request_text_chars: int = Field(
        default=262_144, ge=1,
        description="characters of all texts and labels of one request together (ImageNet's 1,000 class names "
        "are ~15,000): bounds one request's tokenizing to seconds of a core at worst, in 4-byte characters",
    )
    max_request_text_lines: int = Field(
        default=20_000, ge=1,
        description="line breaks in all texts, labels and classify prompts of one request together: open_clip's "
        "text cleaning (ftfy) costs time per line, so a text of 16,000 empty lines costs what 16,000 texts do",
    )
    max_template_chars: int = Field(default=256, ge=3, description="characters per prompt template")
    max_prompts_per_request: int = Field(
        default=100_000, ge=1, description="labels x templates of one /v1/classify request (ImageNet: 80,000)",
    )
    max_request_prompt_chars: int = Field(
        default=6_000_000, ge=1,
        description="characters of all labels x templates prompts of one /v1/classify request, computed before "
        "they are built (ImageNet's 80,000 prompts: about 3 million)",
    )
    max_response_scores: int = Field(
        default=262_144, ge=1,
        description="inputs x (top_k, else labels) scores in one /v1/classify response, checked before scoring",
    )
    max_request_image_pixels: int = Field(
        default=200_000_000, ge=1,
        description="width*height of all images of one request together, checked from headers before decoding",
    )
    max_request_image_bytes: int = Field(
        default=48 * 1024 * 1024, ge=1, description="encoded bytes of all images of one request (inline or fetched)",
    )
    url_connect_timeout_s: float = Field(default=5.0, gt=0, description="image URLs: resolving and connecting")
    url_total_timeout_s: float = Field(default=20.0, gt=0, description="image URLs: one fetch, redirects included")
    url_max_redirects: int = Field(default=3, ge=0, le=10, description="image URLs: redirects followed")
    url_fetches_per_request: int = Field(
        default=8, ge=1, description="image URLs: fetches of one request at a time (the rest wait their turn)"
    )
    url_fetches_per_replica: int = Field(
        default=64, ge=1, description="image URLs: fetches of one preprocessing replica at a time, all requests"
    )


ImageURLPolicy = Literal["off", "public"] | list[str]


class Price(StrictModel):
    """What a model's use costs a key's credit, in US dollars."""

    usd_per_million_tokens: float = Field(default=0.02, ge=0, description="text tokens, as `usage` counts them")
    usd_per_thousand_images: float = Field(default=0.10, ge=0, description="images embedded")


class TenancySettings(StrictModel):
    """Keys as customers (README.md, "Customers: keys, limits, credit and usage"). On when a keys file is set;
    Redis and the database URLs may also come from the environment (a Kubernetes Secret)."""

    keys_file: str | None = Field(
        default=None, description="YAML/JSON file of keys with ids, limits and credit, reloaded when it changes "
        "(also CLIP_KEYS_FILE)",
    )
    redis_url: str | None = Field(
        default=None, description="Redis shared by the ingress replicas for rate limits (also CLIP_REDIS_URL); "
        "none: each replica counts in memory (one replica, the local default)",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL of the usage and credit records (also CLIP_DATABASE_URL); "
        "none: SQLite in ~/.local/share/clip-serve/usage.db",
    )
    fail_closed: bool = Field(
        default=False, description="with Redis unreachable, refuse (503) instead of counting locally with each "
        "limit divided by the ingress replicas",
    )
    price: Price = Field(default_factory=Price, description="what a request costs a key's credit")
    prices: dict[str, Price] = Field(default_factory=dict, description="per served model name, over `price`")
    reload_interval_s: float = Field(default=1.0, gt=0, le=10, description="how often the keys file is checked")
    max_metric_key_ids: int = Field(
        default=1000, ge=1, description="distinct key ids in the per-key metrics; the rest count as `other`",
    )


class JobStages(StrictModel):
    """The two Ray Data stages of a bulk job (serve_app/batch/): their sizes and resources."""

    batch_size: int = Field(default=64, ge=1, le=4096, description="rows per encoder forward pass")
    concurrency: int = Field(default=1, ge=1, description="encoder actors (one model each)")
    num_gpus: float = Field(default=0, ge=0, description="GPUs per encoder actor (0: the encoder runs on CPUs)")
    encoder_cpus: float = Field(default=1, gt=0, description="CPUs per encoder actor; on the CPU, its torch threads")
    preprocess_concurrency: int | None = Field(
        default=None, ge=1,
        description="preprocessing actors (None: an autoscaling pool up to the CPUs the encoders leave)",
    )
    preprocess_cpus: float = Field(default=1, gt=0, description="CPUs per preprocessing actor, when their number "
                                   "is set")
    preprocess_batch_size: int = Field(default=16, ge=1, le=4096, description="rows per preprocessing call (a "
                                       "dataset job's; a batch's stages take a plan row group a call)")
    niceness: int = Field(
        default=0, ge=0, le=19,
        description="raised by this much over the niceness Ray starts its workers at (`RAY_worker_niceness`, the "
        "online replicas' too), up to 19: the stages yield CPUs shared with online replicas",
    )
    idle: bool = Field(
        default=False,
        description="the stages run under Linux's SCHED_IDLE: only on CPU time no other process wants (online work "
        "always first; a saturated node starves the job)",
    )

class BatchAPISettings(StrictModel):
    """OpenAI's Files and Batch API (README.md, "Bulk embedding"): files in `storage`, records in the tenancy
    database, jobs run on Ray Data by the BatchRunner deployment."""

    enabled: bool = Field(default=False, description="serve /v1/files and /v1/batches and run the BatchRunner")
    storage: str | None = Field(
        default=None, description="where files live: a local directory, or s3://bucket/prefix (pyarrow's URI "
        "options, e.g. ?endpoint_override=host:port&scheme=http; credentials from the AWS_* environment) "
        "(also CLIP_BATCH_STORAGE); none: ~/.local/share/clip-serve/files",
    )
    max_file_bytes: int = Field(default=200 * 1024 * 1024, ge=1, description="an uploaded file's size (OpenAI's)")
    max_requests_per_file: int = Field(default=50_000, ge=1, description="lines of a batch's input file")
    max_inputs_per_batch: int = Field(default=50_000, ge=1, description="embedding inputs of all a batch's lines")
    max_active_batches_per_key: int = Field(default=8, ge=1, description="batches of one key not yet finished")
    max_files_per_key: int = Field(default=10_000, ge=1, description="files one key may keep (outputs included)")
    max_stored_bytes_per_key: int = Field(
        default=20 * 1024**3, ge=1, description="bytes of files one key may keep; an upload past it is refused "
        "(outputs are written whatever their size, and count against later uploads)",
    )
    retention_days: float = Field(default=30, gt=0, description="files and batch outputs are deleted after this")
    transfer_timeout_s: float = Field(
        default=900, gt=0, description="uploading or downloading one file (in place of the request deadline)",
    )
    price_factor: float = Field(default=0.5, ge=0, description="a batch's price against the online price")
    lease_s: float = Field(
        default=30, ge=2, description="a runner renews its claim on a batch this often x3; a batch whose claim "
        "lapsed (its runner died) is resumed by another",
    )
    max_attempts: int = Field(default=3, ge=1, description="runs of a batch before it is marked failed")
    poll_interval_s: float = Field(default=1.0, gt=0, le=10, description="how often runners look for work")
    sweep_interval_s: float = Field(default=60, gt=0, description="how often a runner deletes expired files")
    keep_warm_s: float = Field(
        default=600, ge=0, description="a runner's stages (Ray Data actors: their CPUs or GPU, the model in memory) "
        "stay up this long after a batch, so the next batch does not wait for them to start",
    )
    stall_timeout_s: float = Field(
        default=900, gt=0, description="a run of a batch in which no row group came back from the stages for this "
        "long fails (the attempt; the stages are started anew for the next)",
    )
    runner: PoolSettings = Field(
        default_factory=lambda: PoolSettings(num_replicas=1, num_cpus=0.25, max_ongoing_requests=4),
        description="the BatchRunner deployment (it drives jobs; their stages are Ray Data's actors)",
    )
    job: JobStages = Field(default_factory=JobStages)


class AppArgs(StrictModel):
    """Arguments of `serve_app.app:build_app` (YAML `args:` or `serve run ... key=value`).

    The top-level model fields describe a single model; `models` lists several and then wins.
    """

    # one model, flat (what `serve run ... model=... served_model_name=...` sets)
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    served_model_name: str | None = None
    device: Device = "auto"
    precision: Precision = "auto"
    torch_threads: int | None = Field(default=None, ge=1)
    cpu_kernels: CpuKernels = "onednn"
    image_decode: ImageDecode = "exact"
    max_batch_size: int | None = Field(default=None, ge=1)
    batch_wait_timeout_s: float | None = Field(default=None, ge=0.0)
    encoder: PoolSettings | None = None
    # several models
    models: list[ModelSpec] | None = None
    # shared pools and limits
    preprocessor: PoolSettings = Field(default_factory=lambda: PoolSettings(**POOL_DEFAULTS["preprocessor"]))
    ingress: PoolSettings = Field(default_factory=lambda: PoolSettings(**POOL_DEFAULTS["ingress"]))
    layout: Layout = Field(
        default="pools",
        description="pools: ingress, preprocessor and encoder deployments (GPUs, clusters); one-process: all "
        "three in one deployment with the model's encoder pool settings (one model on a CPU-only box)",
    )
    max_inputs_per_request: int = Field(default=2048, ge=1)
    request_timeout_s: float | None = Field(
        default=60.0, gt=0, description="the server's deadline per request: past it the client gets 504 and the "
        "request's work stops (null: none). Shipped configs set Serve's http_options.request_timeout_s a little "
        "longer, as a backstop",
    )
    image_limits: ImageLimits = Field(default_factory=ImageLimits)
    zero_shot: ZeroShotSettings = Field(default_factory=lambda: ZeroShotSettings())
    # hardening (README.md, "Security")
    limits: RequestLimits = Field(default_factory=RequestLimits)
    api_keys: list[str] | None = Field(
        default=None,
        description="keys accepted as `Authorization: Bearer <key>`; also CLIP_API_KEYS (comma-separated) or "
        "a file (`api_keys_file` / CLIP_API_KEYS_FILE, one key a line), read by the ingress replica at start",
    )
    api_keys_file: str | None = Field(default=None, description="file of API keys, one a line ('#' comments)")
    tenancy: TenancySettings = Field(default_factory=TenancySettings)
    batch: BatchAPISettings = Field(default_factory=BatchAPISettings)
    image_url_policy: ImageURLPolicy = Field(
        default="off",
        description="image URLs: off (refused), public (http/https to public addresses only), or a list of "
        "allowed hosts as written in the URL (`host` or `host:port`)",
    )

    @field_validator("preprocessor", "ingress", mode="before")
    @classmethod
    def _pool_defaults(cls, pool: Any, info: ValidationInfo) -> Any:
        return merge_pool(info.field_name, pool)

    def model_specs(self) -> list[ModelSpec]:
        if self.models:
            specs = self.models
        else:
            batching = BatchSettings()
            if self.max_batch_size is not None:
                batching.max_batch_size = self.max_batch_size
            if self.batch_wait_timeout_s is not None:
                batching.batch_wait_timeout_s = self.batch_wait_timeout_s
            spec = ModelSpec(
                model=self.model,
                pretrained=self.pretrained,
                served_model_name=self.served_model_name,
                device=self.device,
                precision=self.precision,
                torch_threads=self.torch_threads,
                cpu_kernels=self.cpu_kernels,
                image_decode=self.image_decode,
                batching=batching,
                **({"encoder": self.encoder} if self.encoder is not None else {}),
            )
            specs = [spec]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"served model names must be unique, got {names}")
        slugs = [s.slug for s in specs]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"served model names {names} collide once made deployment-name safe")
        return specs

    @model_validator(mode="after")
    def _check_models(self) -> "AppArgs":
        specs = self.model_specs()
        if self.layout == "one-process":
            unused = sorted({"preprocessor", "ingress"} & self.model_fields_set)
            if unused:
                raise ValueError(
                    f"layout one-process runs everything in one deployment with the model's `encoder` pool "
                    f"settings; remove {' and '.join(unused)}"
                )
            if len(specs) != 1:  # also: Ray's @serve.batch queues are per class and process, not per encoder
                raise ValueError("layout one-process serves one model; use layout pools for several")
            if specs[0].device == "cuda" or specs[0].encoder_gpus:
                raise ValueError("layout one-process is for CPU-only machines; use layout pools with a GPU")
        return self

    @field_validator("image_url_policy")
    @classmethod
    def _url_hosts(cls, policy: ImageURLPolicy) -> ImageURLPolicy:
        """Hosts as the URL writes them, lower-case; `host:port` or `host` (any port); IPv6 in brackets."""
        if isinstance(policy, list):
            if not policy:
                raise ValueError("image_url_policy: an empty list allows nothing; write 'off'")
            hosts = [entry.strip().lower() for entry in policy]
            for host in hosts:
                if not host or "/" in host or "@" in host:
                    raise ValueError(f"image_url_policy: {host!r} is not `host` or `host:port`")
            return hosts
        return policy
