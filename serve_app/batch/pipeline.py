"""Warm stages: one long-lived Ray Data execution per runner, fed the batches' plans a row group at a time.

Ray Data starts a dataset's actor pools when the dataset runs and stops them when it ends. A Ray Data job per batch
would pay, on every batch, for the stages' worker processes, their imports and the model's load (seconds on a CPU,
far longer for ViT-g on a GPU), which a batch of a few thousand inputs does not amortize. So the runner keeps one
execution going: its source is a queue (`ray.util.queue.Queue`), each of its read tasks takes the next row group the
runner puts there, one read task at a time, and the stages (`LinePreprocess`, `LineEncode`, serve_app/batch/job.py)
stay up between batches. The runner lets the execution go after `keep_warm_s` without a batch, when a batch needs
another model, or when its read tasks run low (an execution's read tasks are listed when it starts).

Rules the execution keeps:
- Every block is one row group of one batch (the `__tag` column names the run it belongs to); a line never spans
  two groups (validation cuts groups between lines). Both stages take whole blocks (`batch_size=None`): a bundler
  waiting for a batch's worth of rows would hold a batch's last rows until the next batch came.
- Order is preserved end to end, so a group's rows arrive together and in order.
- Calls on the Ray Data iterator never overlap (`_call`: each waits for the one before). Rows of a run that stopped early (cancelled) still come out; the next `take` drops them by tag.
"""

import logging
import threading
import time
import uuid
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ray.data import Datasource

if TYPE_CHECKING:
    import pyarrow as pa

    from serve_app.batch.job import JobSpec

logger = logging.getLogger(__name__)

TAG = "__tag"
# The row that ends an execution: the read task that takes it yields it and no more work comes.
END_TAG = "__end__"
# Read tasks of one execution (each takes one row group): a new execution starts before a batch that would not fit.
READS_PER_EXECUTION = 4096
# Row groups waiting in the queue ahead of the read task: enough to keep it busy, few to drop on a cancel.
QUEUED_GROUPS = 2


class QueueSource(Datasource):
    """`READS_PER_EXECUTION` read tasks, each yielding the row group it takes from the queue."""

    def __init__(self, feed: Any) -> None:
        super().__init__()
        self.feed = feed

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[Any]:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(_reader(self.feed), metadata) for _ in range(READS_PER_EXECUTION)]


def _reader(feed: Any) -> Any:
    def read() -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from serve_app.batch.job import plan_schema

        from ray.exceptions import RayActorError

        try:
            tag, path, filesystem, group = feed.get()
        except RayActorError:  # the queue is gone: the execution was closed while this task waited
            return
        if tag == END_TAG:
            schema = plan_schema()
            row = {"line": [0], "custom_id": [""], "index": [0], "count": [1], "encoding_format": ["float"],
                   "kind": ["end"], "value": [""], "param": [""]}
            yield pa.table(row, schema=schema).append_column(TAG, pa.array([END_TAG], pa.string()))
            return
        with filesystem.open_input_file(path) as f:
            table = pq.ParquetFile(f).read_row_group(group)
        yield table.append_column(TAG, pa.array([tag] * table.num_rows, pa.string()))

    return read


class StagePipeline:
    """One warm execution of the two stages for one model."""

    def __init__(self, spec: "JobSpec", model_name: str, thread_init: Any = None) -> None:
        import ray.data
        from ray.data import ActorPoolStrategy, DataContext
        from ray.util.queue import Queue

        from serve_app.batch.dataset import IO_CPUS, encoder_spec, preprocess_pool
        from serve_app.batch.job import LineEncode, LinePreprocess

        model = next((s for s in spec.models if s.name == model_name), None)
        if model is None:  # validation lets no line of an unserved model through
            raise ValueError(f"model {model_name!r} is not served")
        self.model_name = model_name
        context = DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        stages = spec.stages
        actors, cpus = preprocess_pool(stages)
        pool = ActorPoolStrategy(size=actors) if isinstance(actors, int) else \
            ActorPoolStrategy(min_size=actors[0], max_size=actors[1])
        self.feed = Queue(maxsize=QUEUED_GROUPS, actor_options={"num_cpus": 0})
        ds = ray.data.read_datasource(QueueSource(self.feed), concurrency=1, num_cpus=IO_CPUS)
        ds = ds.map_batches(
            LinePreprocess, fn_constructor_kwargs={"spec": model, "image_limits": spec.image_limits,
                                                   "limits": spec.limits, "url_policy": spec.url_policy,
                                                   "niceness": stages.niceness, "idle": stages.idle},
            batch_format="pyarrow", batch_size=None, num_cpus=cpus, compute=pool,
        )
        ds = ds.map_batches(
            LineEncode, fn_constructor_kwargs={"spec": encoder_spec(model, stages), "batch_size": stages.batch_size,
                                               "niceness": stages.niceness, "idle": stages.idle},
            batch_format="pyarrow", batch_size=None, compute=ActorPoolStrategy(size=stages.concurrency),
            num_gpus=stages.num_gpus, num_cpus=stages.encoder_cpus,
        )
        self._batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
        self._thread_init = thread_init
        self._next: Future | None = self._call(next, self._batches)  # starts the execution: actors start
        self._fed = 0
        self._failed: BaseException | None = None
        self.last_used = time.monotonic()

    # ------------------------------------------------------------ state

    @property
    def alive(self) -> bool:
        return self._next is not None and self._failed is None

    def reads_left(self) -> int:
        return READS_PER_EXECUTION - self._fed

    def idle_s(self) -> float:
        return time.monotonic() - self.last_used

    # ------------------------------------------------------------ a run

    def new_run(self) -> str:
        self.last_used = time.monotonic()
        return uuid.uuid4().hex

    def put(self, tag: str, path: str, filesystem: Any, group: int) -> bool:
        """Queues one row group; False when the queue is full (the stages are busy)."""
        from ray.util.queue import Full

        self._check()
        try:
            self.feed.put((tag, path, filesystem, group), block=False)
        except Full:
            return False
        self._fed += 1
        return True

    def drop_queued(self) -> None:
        """Row groups not yet taken by a read task leave the queue (a run that stopped early)."""
        from ray.util.queue import Empty

        while True:
            try:
                self.feed.get_nowait()
            except Empty:
                return
            self._fed -= 1

    def take(self, tag: str, timeout_s: float) -> "pa.Table | None":
        """The next block of run `tag`, or None when none came within `timeout_s`; blocks of other runs are
        dropped. Raises what ended the execution (an actor that died, a stage's error)."""
        self.last_used = time.monotonic()
        deadline = time.monotonic() + timeout_s
        while True:
            table = self._pull(max(0.0, deadline - time.monotonic()))
            if table is None:
                return None
            if table.num_rows and table.column(TAG)[0].as_py() == tag:
                return table.drop_columns([TAG])

    def _pull(self, timeout_s: float, again: bool = True) -> "pa.Table | None":
        from concurrent.futures import TimeoutError as FutureTimeout

        self._check()
        assert self._next is not None
        try:
            table = self._next.result(timeout_s)
        except FutureTimeout:
            return None
        except BaseException as exc:
            self._failed = exc if not isinstance(exc, StopIteration) else RuntimeError("the stages' execution ended")
            raise self._failed from None
        if again:
            self._next = self._call(next, self._batches)
        return table

    def _check(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"the stages' execution failed: {self._failed!r}")
        if self._next is None:
            raise RuntimeError("the stages' execution was closed")

    # ------------------------------------------------------------ the end

    def close(self, timeout_s: float = 60.0) -> None:
        """Ends the execution: the end row through the queue (a read task is waiting on it), then the iterator
        closed, which stops the executor and its actors."""
        if self._next is None:
            return
        try:
            if self._failed is None:
                self.drop_queued()
                self.feed.put((END_TAG, None, None, None), timeout=timeout_s)
                self._fed += 1
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    table = self._pull(max(0.0, deadline - time.monotonic()), again=False)
                    if table is not None and table.num_rows and table.column(TAG)[0].as_py() == END_TAG:
                        break  # the iterator is idle now: it can be closed
                    if table is not None:
                        self._next = self._call(next, self._batches)
        except Exception as exc:  # closing anyway
            logger.info("stages' execution ended while closing: %r", exc)
        finally:
            pending, self._next = self._next, None
            try:
                if pending.done():  # else a pull still waits on the execution: it ends with the process
                    self._call(self._close_iterator).result(timeout_s)
            except Exception:
                logger.exception("closing the stages' execution failed")
            try:
                import ray

                ray.kill(self.feed.actor)
            except Exception:
                pass

    def _call(self, fn: Any, *args: Any) -> Future:
        """`fn(*args)` on a daemon thread of its own (at the job's priority): calls on the iterator never overlap (each
        waits for the one before), and one still waiting never holds the process open at its exit."""
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

    def _close_iterator(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
