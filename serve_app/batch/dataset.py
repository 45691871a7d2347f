"""The Ray Data pipeline: a Dataset of rows in, a Dataset of embeddings out, with the online service's code.

Two stages, as in Ray Data's batch-inference examples: `Preprocess` (CPU actors; decoding, open_clip's transform and
the tokenizer through `ModelPreprocessing`, exactly as the preprocessing pool does) and `Encode` (actors holding one
`EncoderCore` each, on GPUs or CPUs, as the encoder pool does). Uint8 pixels (or token ids) pass between them: 4x
smaller than floats, normalised on the encoder's device. Everything streams: no stage ever holds the dataset.

Rows in: a string `id` and the column to embed (`embed_dataset(column=...)`): image bytes, an image path (only with
`allow_paths`) or an http(s) URL (only under `image_url_policy`), or a text. Rows out, one per row in (order not
kept): `id`, `embedding` (list<float32>, a unit vector; null when the row failed), every other input column as it
came (metadata; a column of image bytes is dropped) and `error` (null, or why the row failed). A bad row (an image
that does not decode, a refused URL, an empty text) is reported in `error`, never fatal: failed rows stay in the
same output, so one Parquet holds every row of the source.
"""

import asyncio
import logging
import math
import os
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from serve_app.config import AppArgs, ImageLimits, ImageURLPolicy, JobStages, ModelSpec, RequestLimits

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import ray.data

logger = logging.getLogger(__name__)

Kind = Literal["images", "texts"]

ID = "id"
EMBEDDING = "embedding"
ERROR = "error"
OUTPUT_COLUMNS = (ID, EMBEDDING, ERROR)
# Between the stages only; dropped before the output.
_PIXELS = "__clip_pixels"
_TOKENS = "__clip_tokens"
# CPUs of one read or write task: they mostly wait on storage (Ray Data's budget still bounds how many run).
IO_CPUS = 0.25
# CPUs the actor pools leave free for Ray Data's tasks: reads, writes, and the file listing of its Parquet reader,
# which asks for a whole CPU. Actors hold their CPUs for the whole job: without this, a small machine deadlocks.
TASK_CPUS = 1.0
MIN_PREPROCESS_CPUS = 0.25


class EmbedSettings(JobStages):
    """How a dataset job runs: stage sizes (`JobStages`) and the same input limits as the online service."""

    image_limits: ImageLimits = Field(default_factory=ImageLimits)
    limits: RequestLimits = Field(
        default_factory=RequestLimits, description="max_text_chars and the image URL timeouts, as the online path",
    )
    image_url_policy: ImageURLPolicy = Field(
        default="off", description="image URLs: off (each such row fails), public, or a list of allowed hosts",
    )
    allow_paths: bool = Field(
        default=False,
        description="string image values that are not URLs name files (local or object storage), relative ones "
        "under `path_base`: for an operator's own datasets, never for a client's file",
    )
    path_base: str | None = Field(default=None, description="where relative image paths are resolved")

    @field_validator("image_url_policy")
    @classmethod
    def _url_hosts(cls, policy: ImageURLPolicy) -> ImageURLPolicy:
        return AppArgs._url_hosts(policy)  # the service's own rule for the policy's spelling


def _reason(exc: BaseException) -> str:
    """A failed row's `error`: the online answer's message for the service's own errors (they never name the row:
    rows with the same problem count together), the exception type and message for anything else."""
    from serve_app.errors import ServeAppError

    if isinstance(exc, ServeAppError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


@lru_cache(maxsize=64)
def _filesystem_for(prefix: str) -> "Any":
    from pyarrow import fs

    return fs.LocalFileSystem() if not prefix else fs.FileSystem.from_uri(prefix + "/")[0]


def resolve_path(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local path or a `scheme://bucket/key` URI; one filesystem per bucket."""
    if "://" in path:
        scheme, rest = path.split("://", 1)
        bucket, _, key = rest.partition("/")
        if scheme == "file":
            return _filesystem_for(""), "/" + rest.lstrip("/")
        return _filesystem_for(f"{scheme}://{bucket}"), f"{bucket}/{key}".rstrip("/")
    return _filesystem_for(""), os.path.abspath(path)


def join_path(base: str | None, path: str) -> str:
    if "://" in path or os.path.isabs(path) or not base:
        return path
    return base.rstrip("/") + "/" + path


class Preprocess:
    """CPU stage: each row's image decoded and transformed (or text tokenized) by `ModelPreprocessing`, built once
    per actor. A row that cannot be read gets its reason in `error` and zeros as its pixels (the encoder skips it)."""

    def __init__(self, spec: ModelSpec, kind: Kind, column: str, settings: EmbedSettings) -> None:
        lower_priority(settings.niceness, settings.idle)  # before any import: loading is work too
        import torch
        from PIL import Image

        from serve_app.preprocess import ModelPreprocessing

        torch.set_num_threads(1)  # one core per actor: Ray Data runs as many actors as there are cores to spare
        Image.MAX_IMAGE_PIXELS = settings.image_limits.max_image_pixels  # Pillow's own guard agrees with ours
        self.kind = kind
        self.column = column
        self.settings = settings
        self.preprocessing = ModelPreprocessing(spec, settings.image_limits)
        self.fetcher = None
        if settings.image_url_policy != "off":
            from serve_app.fetch import ImageFetcher

            self.fetcher = ImageFetcher(settings.image_url_policy, settings.limits,
                                        settings.image_limits.max_image_bytes)

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import pyarrow as pa

        clash = {EMBEDDING, ERROR, _PIXELS, _TOKENS} & set(batch.column_names)
        if clash:  # a configuration error, not a bad row: the whole job stops
            raise ValueError(f"input columns {sorted(clash)} clash with the output's; rename them")
        values = batch.column(self.column).to_pylist()
        (name, work), errors = (self._pixels if self.kind == "images" else self._tokens)(values)
        kept = batch.drop_columns([self.column]) if _is_bytes(batch.schema.field(self.column).type) else batch
        return kept.append_column(name, work).append_column(ERROR, pa.array(errors, type=pa.string()))

    # ---------------------------------------------------------------- images

    def _pixels(self, values: list[Any]) -> tuple[tuple[str, Any], list[str | None]]:
        import numpy as np
        from ray.data.extensions import ArrowTensorArray

        raws, errors = self._image_bytes(values)
        shape = (3, *self.preprocessing.config.image_size)
        pixels = np.zeros((len(values), *shape), dtype=np.uint8)
        for i, raw in enumerate(raws):
            if errors[i] is not None:
                continue
            try:
                pixels[i] = self._decode(raw)
            except Exception as exc:  # a bad image fails its own row only
                errors[i] = _reason(exc)
        return (_PIXELS, ArrowTensorArray.from_numpy(pixels)), errors

    def _decode(self, raw: bytes) -> "np.ndarray":
        from serve_app.errors import PayloadTooLarge

        limit = self.settings.image_limits.max_image_bytes
        if len(raw) > limit:  # the online path checks this on the base64 or while fetching
            raise PayloadTooLarge(f"image is larger than the {limit} byte limit", param=ID)
        return self.preprocessing.pixels(raw, ID)

    def _image_bytes(self, values: list[Any]) -> tuple[list[bytes | None], list[str | None]]:
        """Each row's encoded image: bytes as they are, files read, URLs fetched under the policy."""
        from serve_app.inputs import is_url

        raws: list[bytes | None] = [None] * len(values)
        errors: list[str | None] = [None] * len(values)
        urls: list[int] = []
        for i, value in enumerate(values):
            try:
                if isinstance(value, (bytes, bytearray, memoryview)):
                    raws[i] = bytes(value)
                    if not raws[i]:
                        errors[i] = "image is empty"
                elif value is None or value == "":
                    errors[i] = "no image in this row"
                elif not isinstance(value, str):
                    errors[i] = f"image column holds {type(value).__name__}, not bytes, a path or a URL"
                elif is_url(value):
                    urls.append(i)
                elif not self.settings.allow_paths:
                    errors[i] = "image paths are not read here; send the image's bytes"
                else:
                    raws[i] = self._read_file(join_path(self.settings.path_base, value))
            except Exception as exc:
                errors[i] = _reason(exc)
        if urls:
            if self.fetcher is None:
                for i in urls:
                    errors[i] = "image URLs are not fetched (image_url_policy off)"
            else:
                limits = self.settings.limits
                fetched = asyncio.run(fetch_images(self.fetcher, [values[i] for i in urls], [ID] * len(urls),
                                                   limits.url_fetches_per_request,
                                                   self.settings.image_limits.max_image_bytes))
                for i, result in zip(urls, fetched):
                    if isinstance(result, BaseException):
                        errors[i] = _reason(result)
                    elif not result:
                        errors[i] = "image URL returned an empty body"
                    else:
                        raws[i] = result
        return raws, errors

    def _read_file(self, path: str) -> bytes:
        from pyarrow import fs

        from serve_app.errors import InvalidRequest, PayloadTooLarge

        filesystem, where = resolve_path(path)
        info = filesystem.get_file_info(where)
        if info.type != fs.FileType.File:
            raise InvalidRequest("image file not found")
        limit = self.settings.image_limits.max_image_bytes
        if info.size is not None and info.size > limit:
            raise PayloadTooLarge(f"image is larger than the {limit} byte limit")
        with filesystem.open_input_file(where) as f:
            return f.read()

    # ---------------------------------------------------------------- texts

    def _tokens(self, values: list[Any]) -> tuple[tuple[str, Any], list[str | None]]:
        import numpy as np
        from ray.data.extensions import ArrowTensorArray

        from serve_app.errors import InvalidRequest
        from serve_app.inputs import text_input

        max_chars = self.settings.limits.max_text_chars
        errors: list[str | None] = [None] * len(values)
        for i, value in enumerate(values):
            try:
                if not isinstance(value, str):
                    raise InvalidRequest("no text in this row" if value is None else
                                         f"text column holds {type(value).__name__}, not a string")
                text_input(value, ID)
                if len(value) > max_chars:  # the online path's per-text limit, in its words
                    raise InvalidRequest(f"text has {len(value)} characters; the limit is {max_chars} (CLIP reads "
                                         "only a text's first 77 tokens)")
            except Exception as exc:
                errors[i] = _reason(exc)
        good = [i for i, e in enumerate(errors) if e is None]
        tokens = np.zeros((len(values), self.preprocessing.config.context_length), dtype=np.int64)
        if good:
            tokens[good] = self.preprocessing.texts([values[i] for i in good]).tokens.numpy()
        return (_TOKENS, ArrowTensorArray.from_numpy(tokens)), errors


class Encode:
    """Encoder stage: one `EncoderCore` per actor (the online encoder's model and forward passes), fed the good rows
    of each batch; a failed row's embedding is null."""

    def __init__(self, spec: ModelSpec, kind: Kind, niceness: int = 0, idle: bool = False) -> None:
        lower_priority(niceness, idle)
        from serve_app.encoder import EncoderCore

        self.kind = kind
        self.core = EncoderCore(spec)
        logger.info("clip-embed encoder %s on %s/%s (%s kernels), loaded in %.1fs", spec.name, self.core.device,
                    self.core.precision, self.core.kernels, self.core.load_seconds)

    def __call__(self, batch: "pa.Table") -> "pa.Table":
        import numpy as np
        import pyarrow as pa
        import torch
        from ray.data.block import BlockAccessor

        column = _PIXELS if self.kind == "images" else _TOKENS
        ok = np.asarray(batch.column(ERROR).is_null(), dtype=bool)
        vectors = np.zeros((0, 0), dtype=np.float32)
        if ok.any():
            rows = torch.from_numpy(np.ascontiguousarray(BlockAccessor.for_block(batch.select([column]))
                                                         .to_numpy(column)[ok]))
            if self.kind == "images":
                self.core.check_pixels(rows)
                vectors = self.core.encode_images(rows)
            else:
                self.core.check_tokens(rows)
                vectors = self.core.encode_texts(rows)
        out = batch.drop_columns([column]).append_column(EMBEDDING, embedding_column(ok, vectors))
        # `id` and `embedding` first and `error` last, the metadata between
        return out.select([ID, EMBEDDING, *[c for c in out.column_names if c not in OUTPUT_COLUMNS], ERROR])


async def fetch_images(fetcher: Any, urls: list[str], params: list[str], at_once: int, max_bytes: int) -> list[Any]:
    """Each URL's bytes, or the exception that ended its fetch: the online preprocessor's `ImageFetcher` (its URL
    policy, timeouts and redirects), `at_once` fetches at a time, each within `max_bytes`."""
    from serve_app.fetch import Budget

    slots = asyncio.Semaphore(at_once)

    async def fetch(url: str, param: str) -> bytes:
        async with slots:
            return await fetcher.fetch(url, param, Budget(max_bytes, param))

    return await asyncio.gather(*(fetch(u, p) for u, p in zip(urls, params)), return_exceptions=True)


def lower_priority(niceness: int, idle: bool = False) -> None:
    """The calling thread (and the threads it starts later: torch's, a decoder's) made to yield the CPU: its
    niceness raised by `niceness` (relative: Ray starts every worker, the online replicas too, at its own
    `worker_niceness`), and with `idle` scheduled under SCHED_IDLE (Linux), run only when nothing else wants the
    CPU. A bulk stage beside online replicas then gets what they leave."""
    if niceness > 0:
        os.nice(min(niceness, 19 - os.nice(0)))
    if idle and hasattr(os, "sched_setscheduler"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def embedding_column(ok: "np.ndarray", vectors: "np.ndarray") -> "pa.Array":
    """list<float32> with one row per `ok` entry: the next row of `vectors` where ok, null where not."""
    import numpy as np
    import pyarrow as pa

    width = vectors.shape[1] if len(vectors) else 0
    offsets = np.zeros(len(ok) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(ok * width)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.reshape(-1), type=pa.float32()),
                                    mask=pa.array(~ok))


def _is_bytes(type_: "pa.DataType") -> bool:
    import pyarrow as pa

    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_)


def preprocess_pool(settings: EmbedSettings, free_cpus: float | None = None) -> tuple[int | tuple[int, int], float]:
    """(actors, CPUs per actor) of the preprocessing stage. Set: that many actors of 1 CPU. Else an autoscaling pool
    of 1-CPU actors up to the CPUs free when the job starts (a cluster may run a Serve app too) less the encoder
    actors' and TASK_CPUS; where that is under one CPU, one actor with what is left. Too few CPUs is an error at
    once: an actor pool that cannot start would leave the job waiting forever."""
    if settings.preprocess_concurrency:  # an operator's choice (an autoscaling cluster: CPUs not known yet)
        return settings.preprocess_concurrency, settings.preprocess_cpus
    if free_cpus is None:
        import ray

        free_cpus = ray.available_resources().get("CPU", 0) if ray.is_initialized() else float(os.cpu_count() or 1)
    spare = free_cpus - settings.concurrency * settings.encoder_cpus - TASK_CPUS
    if spare >= 1:
        return (1, math.floor(spare)), 1.0
    if spare >= MIN_PREPROCESS_CPUS:
        return 1, round(spare, 2)
    raise ValueError(f"{free_cpus:g} free CPUs leave too few for preprocessing beside {settings.concurrency} encoder "
                     f"actor(s) of {settings.encoder_cpus:g} CPUs: lower --encoder-cpus or --concurrency, or set "
                     "--preprocess-concurrency (on an autoscaling cluster)")


def encoder_spec(spec: ModelSpec, settings: EmbedSettings) -> ModelSpec:
    """The spec an encoder actor loads: on the CPU (fp32, as the service), one torch thread per CPU it was given
    (whatever the service's own encoder uses); on a GPU, device cuda."""
    update: dict[str, Any] = {}
    if settings.num_gpus and spec.device == "auto":
        update["device"] = "cuda"
    if not settings.num_gpus:  # the job's CPUs, not the online encoder's threads
        update["torch_threads"] = max(1, math.ceil(settings.encoder_cpus))
    return spec.model_copy(update=update) if update else spec


def embed_dataset(
    ds: "ray.data.Dataset", spec: ModelSpec, kind: Kind, column: str, settings: EmbedSettings | None = None,
) -> "ray.data.Dataset":
    """Rows with a string `id` and `column` (what to embed) -> rows with `id`, `embedding`, the other columns and
    `error` (module docstring). Lazy, like every Ray Data transform: it runs when the result is written or
    iterated, streaming."""
    settings = settings or EmbedSettings()
    if column in (ID, EMBEDDING, _PIXELS, _TOKENS):
        raise ValueError(f"cannot embed column {column!r}: the name is the pipeline's own")
    from ray.data import ActorPoolStrategy

    actors, cpus = preprocess_pool(settings)
    pool = ActorPoolStrategy(size=actors) if isinstance(actors, int) else \
        ActorPoolStrategy(min_size=actors[0], max_size=actors[1])
    preprocessed = ds.map_batches(
        Preprocess, fn_constructor_kwargs={"spec": spec, "kind": kind, "column": column, "settings": settings},
        batch_format="pyarrow", batch_size=settings.preprocess_batch_size, num_cpus=cpus, compute=pool,
    )
    return preprocessed.map_batches(
        Encode, fn_constructor_kwargs={"spec": encoder_spec(spec, settings), "kind": kind,
                                       "niceness": settings.niceness, "idle": settings.idle},
        batch_format="pyarrow", batch_size=settings.batch_size, compute=ActorPoolStrategy(size=settings.concurrency),
        num_gpus=settings.num_gpus, num_cpus=settings.encoder_cpus,
    )
