"""Configuration enters once: the YAML/CLI `args` of `build_app`, validated by these models.

Per-pool settings (replicas or Ray's `autoscaling_config`, CPUs, GPUs, `max_ongoing_requests`) sit in one
`PoolSettings` per deployment so that autoscaling can be tuned per pool without touching code.
"""

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MODEL = "hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K"

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Layout = Literal["pools", "one-process"]
Device = Literal["auto", "cpu", "cuda"]
CpuKernels = Literal["onednn", "eager"]


class StrictModel(BaseModel):
    """Configuration typos are errors: an unknown key fails at `serve run`, not silently at 3 a.m."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class PoolSettings(StrictModel):
    """Ray Serve options of one deployment (a pool of replicas)."""

    num_replicas: int | Literal["auto"] | None = None
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
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
        for key in ("max_ongoing_requests", "max_queued_requests"):
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
    """Dynamic batching of one encoder; changeable at run time through `user_config`."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    # No wait by default: while a forward pass runs the encoder holds new calls back and lets them in together,
    # so batches fill under load without a wait, and an idle encoder starts at once (a wait only adds
    # latency then: BENCHMARKS.md, "Batch wait 0 against 2 ms, on one server").
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    text_max_batch_size: int = Field(default=64, ge=1, le=4096)
    text_batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    # After a pass, wait for the callers it answered to come back (closed-loop clients) for at most this
    # fraction of the pass's duration, and no longer once arrivals pause for `refill_gap_s`; 0 turns it off.
    # Only when the pass answered at least twice the rows that arrived during it (serve_app/pass_gate.py).
    refill_wait_fraction: float = Field(default=0.5, ge=0.0, le=4.0)
    refill_gap_s: float = Field(default=0.01, ge=0.0, le=10.0)


def _default_encoder_pool() -> PoolSettings:
    return PoolSettings(num_replicas=1, max_ongoing_requests=256, num_cpus=1)


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
    batching: BatchSettings = Field(default_factory=BatchSettings)
    encoder: PoolSettings = Field(default_factory=_default_encoder_pool)
    health_max_age_s: float = Field(default=30.0, gt=0, description="/health probes an encoder idle longer")

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
    body_read_timeout_s: float = Field(
        default=30.0, gt=0,
        description="seconds from the request's start until its whole body has arrived; a client that trickles "
        "its body past it gets 408 and frees its ingress slot",
    )
    max_text_chars: int = Field(
        default=1000, ge=1,
        description="characters per text input, label and rerank query/document (400 past it). CLIP reads at "
        "most 77 tokens (a few hundred characters), but open_clip tokenizes the whole text first, in time "
        "quadratic in a word's length: one 1,000-letter word takes ~0.1 s, one of 8,000 ~4 s",
    )
    max_request_text_chars: int = Field(
        default=65_536, ge=1,
        description="characters of all texts and labels of one request together (ImageNet's 1,000 class names "
        "are ~15,000); bounds one request's tokenizer time to a few seconds at worst",
    )
    max_template_chars: int = Field(default=256, ge=3, description="characters per prompt template")
    max_prompts_per_request: int = Field(
        default=100_000, ge=1, description="labels x templates of one /v1/classify request (ImageNet: 80,000)",
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


ImageURLPolicy = Literal["off", "public"] | list[str]


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
    max_batch_size: int | None = Field(default=None, ge=1)
    batch_wait_timeout_s: float | None = Field(default=None, ge=0.0)
    encoder: PoolSettings | None = None
    # several models
    models: list[ModelSpec] | None = None
    # shared pools and limits
    preprocessor: PoolSettings = Field(
        default_factory=lambda: PoolSettings(num_replicas=1, max_ongoing_requests=64, num_cpus=0.5)
    )
    ingress: PoolSettings = Field(
        default_factory=lambda: PoolSettings(num_replicas=1, max_ongoing_requests=256, num_cpus=0.25)
    )
    layout: Layout = Field(
        default="pools",
        description="pools: ingress, preprocessor and encoder deployments (GPUs, clusters); one-process: all "
        "three in one deployment with the model's encoder pool settings (one model on a CPU-only box)",
    )
    max_inputs_per_request: int = Field(default=2048, ge=1)
    image_limits: ImageLimits = Field(default_factory=ImageLimits)
    zero_shot: ZeroShotSettings = Field(default_factory=lambda: ZeroShotSettings())
    # hardening (docs/SECURITY-section.md)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    api_keys: list[str] | None = Field(
        default=None,
        description="keys accepted as `Authorization: Bearer <key>`; also CLIP_API_KEYS (comma-separated) or "
        "a file (`api_keys_file` / CLIP_API_KEYS_FILE, one key a line), read by the ingress replica at start",
    )
    api_keys_file: str | None = Field(default=None, description="file of API keys, one a line ('#' comments)")
    image_url_policy: ImageURLPolicy = Field(
        default="off",
        description="image URLs: off (refused), public (http/https to public addresses only), or a list of "
        "allowed hosts as written in the URL (`host` or `host:port`)",
    )

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
