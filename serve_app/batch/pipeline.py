"""Warm stages: one long-lived Ray Data execution per runner, fed the batches' plans a row group at a time.

Ray Data starts a dataset's actor pools when the dataset runs and stops them when it ends. A Ray Data job per batch
would pay, on every batch, for the stages' worker processes, their imports and the model's load (seconds on a CPU,
far longer for ViT-g on a GPU), which a batch of a few thousand inputs does not amortize. So the runner keeps one
execution going: its source (`FeedSource`) lists `reads` read tasks, read task i yields the i-th row group the runner
feeds (`_Feed`, an actor), and the stages (`LinePreprocess`, `LineEncode`, serve_app/batch/job.py) stay up between
batches. The runner lets the execution go after `keep_warm_s` without a batch, when a batch needs another model,
when a batch stops early (its row groups in flight are nobody's work), and when its read tasks run low.

Rules the execution keeps:
- Every block is one row group of one run (the `__tag` column names the run); both stages take whole blocks
  (`batch_size=None`): a bundler waiting for a batch's worth of rows would hold a run's last rows until the next
  run came.
- Order is preserved end to end: a run's groups come back in the order they were fed (a line cut between two groups
  is put together again by the caller).
- Read task i asks the feed for item i, however often Ray retries it: a retried read never takes another group.
- Calls on the Ray Data iterator never overlap (`_call`: each waits for the one before).
"""

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING, Any

import ray
from ray.data import Datasource

if TYPE_CHECKING:
    import pyarrow as pa

    from serve_app.batch.job import JobSpec

logger = logging.getLogger(__name__)

TAG = "__tag"
# The row of an execution's end: what every read task yields once the feed is closed.
END_TAG = "__end__"
# Read tasks of one execution, at least (each takes one row group): a new execution starts before a batch whose
# groups would not fit in what is left.
READS_PER_EXECUTION = 4096


@ray.remote(num_cpus=0)
class _Feed:
    """Row groups by their number: `get(i)` waits for the i-th, or answers None once the feed is closed."""

    def __init__(self) -> None:
        self.items: dict[int, Any] = {}
        self.closed = False
        self.changed = asyncio.Condition()

    async def put(self, number: int, item: Any) -> None:
        async with self.changed:
            self.items[number] = item
            self.changed.notify_all()

    async def get(self, number: int) -> Any:
        async with self.changed:
            await self.changed.wait_for(lambda: number in self.items or self.closed)
            return self.items.get(number)

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()


class FeedSource(Datasource):
    """`reads` read tasks; the i-th yields the feed's i-th row group (or the end row)."""

    def __init__(self, feed: Any, reads: int) -> None:
        super().__init__()
        self.feed = feed
        self.reads = reads

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(_reader(self.feed, number), metadata) for number in range(self.reads)]


def _reader(feed: Any, number: int) -> Any:
    def read() -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from ray.exceptions import RayActorError

        from serve_app.batch.job import plan_schema

        try:
            item = ray.get(feed.get.remote(number))
        except RayActorError:  # the feed is gone: the execution is being shut down
            item = None
        if item is None:
            row = {"line": [0], "custom_id": [""], "index": [0], "count": [1], "encoding_format": ["float"],
                   "kind": ["end"], "value": [""], "param": [""]}
            yield pa.table(row, schema=plan_schema()).append_column(TAG, pa.array([END_TAG], pa.string()))
            return
        tag, path, filesystem, group = item
        with filesystem.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(group)
        yield table.append_column(TAG, pa.array([tag] * table.num_rows, pa.string()))

    return read


class StagePipeline:
    """One warm execution of the two stages for one model."""

    def __init__(self, spec: "JobSpec", model_name: str, reads: int = READS_PER_EXECUTION,
                 thread_init: Any = None) -> None:
        import ray.data
        from ray.data import ActorPoolStrategy, DataContext

        from serve_app.batch.dataset import IO_CPUS, encoder_spec, preprocess_pool
        from serve_app.batch.job import LineEncode, LinePreprocess

        model = next((s for s in spec.models if s.name == model_name), None)
        if model is None:  # validation lets no line of an unserved model through
            raise ValueError(f"model {model_name!r} is not served")
        self.model_name = model_name
        self.reads = reads
        self._thread_init = thread_init
        self._fed = 0
        self._failed: BaseException | None = None
        self._next: Future | None = None
        self._closed = threading.Event()
        self.last_used = time.monotonic()
        context = DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        stages = spec.stages
        actors, cpus = preprocess_pool(stages)
        pool = ActorPoolStrategy(size=actors) if isinstance(actors, int) else \
            ActorPoolStrategy(min_size=actors[0], max_size=actors[1])
        self.feed = _Feed.remote()
        try:
            ds = ray.data.read_datasource(FeedSource(self.feed, reads), concurrency=1, num_cpus=IO_CPUS)
            ds = ds.map_batches(
                LinePreprocess, fn_constructor_kwargs={"spec": model, "image_limits": spec.image_limits,
                                                       "limits": spec.limits, "url_policy": spec.url_policy,
                                                       "niceness": stages.niceness, "idle": stages.idle},
                batch_format="pyarrow", batch_size=None, num_cpus=cpus, compute=pool,
            )
            ds = ds.map_batches(
                LineEncode, fn_constructor_kwargs={"spec": encoder_spec(model, stages),
                                                   "batch_size": stages.batch_size, "niceness": stages.niceness,
                                                   "idle": stages.idle},
                batch_format="pyarrow", batch_size=None, compute=ActorPoolStrategy(size=stages.concurrency),
                num_gpus=stages.num_gpus, num_cpus=stages.encoder_cpus,
            )
            self._batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
        except BaseException:
            ray.kill(self.feed)
            raise
        self._next = self._call(next, self._batches)  # starts the execution: the actors start

    # ------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        """False once the execution failed (noticed while idle too) or was closed."""
        pending = self._next
        if pending is None or self._failed is not None:
            return False
        return not (pending.done() and pending.exception() is not None)

    def reads_left(self) -> int:
        return self.reads - self._fed

    def idle_s(self) -> float:
        return time.monotonic() - self.last_used

    # ------------------------------------------------------------ a run

    def new_run(self) -> str:
        self.last_used = time.monotonic()
        return uuid.uuid4().hex

    def put(self, tag: str, path: str, filesystem: Any, group: int) -> None:
        """Feeds one row group of run `tag`; it comes back from `take` after the groups fed before it."""
        self._check()
        if self._fed >= self.reads:
            raise RuntimeError("the stages' execution has no read task left")
        ray.get(self.feed.put.remote(self._fed, (tag, path, filesystem, group)))
        self._fed += 1

    def take(self, tag: str, timeout_s: float) -> "pa.Table | None":
        """The next block of run `tag`, or None when none came within `timeout_s`; rows of other runs are dropped.
        Raises what ended the execution (an actor that died, a stage's error)."""
        import pyarrow.compute as pc

        self.last_used = time.monotonic()
        deadline = time.monotonic() + timeout_s
        while True:
            table = self._pull(max(0.0, deadline - time.monotonic()))
            if table is None:
                return None
            mine = table.filter(pc.equal(table.column(TAG), tag))
            if mine.num_rows:
                return mine.drop_columns([TAG])

    def _pull(self, timeout_s: float) -> "pa.Table | None":
        self._check()
        pending = self._next
        assert pending is not None
        wait([pending], timeout=timeout_s)
        if not pending.done():
            return None
        error = pending.exception()
        if error is not None:
            self._failed = error if not isinstance(error, StopIteration) else \
                RuntimeError("the stages' execution ended")
            raise self._failed
        self._next = self._call(next, self._batches)
        return pending.result()

    def _check(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"the stages' execution failed: {self._failed!r}")
        if self._next is None:
            raise RuntimeError("the stages' execution was closed")

    # ------------------------------------------------------------ the end

    def close(self, timeout_s: float = 120.0) -> bool:
        """Ends the execution: the feed closed (read tasks waiting on it yield the end row), then, as soon as the
        pull in progress returns (the next block in flight, or that end row), the iterator closed, which stops the
        executor and kills its actors; work still in flight is dropped. True when that was done within
        `timeout_s` (else it happens when the pull returns)."""
        pending, self._next = self._next, None
        if pending is None:
            return self._closed.is_set()
        try:
            ray.get(self.feed.close.remote(), timeout=timeout_s)
        except Exception as exc:  # a feed that is gone ends its read tasks the same way
            logger.info("the stages' feed did not close: %r", exc)
        pending.add_done_callback(lambda _: self._call(self._close_iterator))
        done = self._closed.wait(timeout_s)
        if not done:
            logger.warning("batch stages for %s: still closing after %.0f s", self.model_name, timeout_s)
        return done

    def _close_iterator(self) -> None:
        try:
            close = getattr(self._batches, "close", None)
            if close is not None:
                close()
        finally:
            try:
                ray.kill(self.feed)
            except Exception:
                pass
            self._closed.set()

    def _call(self, fn: Any, *args: Any) -> Future:
        """`fn(*args)` on a daemon thread of its own (at the job's priority): calls on the iterator never overlap
        (each waits for the one before), and one still waiting never holds the process open at its exit."""
        future: Future = Future()

        def run() -> None:
            if self._thread_init is not None:
                self._thread_init()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, name="batch-stages", daemon=True).start()
        return future
