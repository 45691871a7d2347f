"""BatchRunner deployment: claims batches from the database and runs each as a Ray Data job (serve_app/batch/job.py).

Its state is the batch's record, not its memory: a runner holds a lease on the batch it runs and renews it while the
job streams; if the runner dies, its lease lapses and the next runner to look (the restarted replica, or another)
runs the batch again from the start, at most `max_attempts` times, then marks it `failed`. Ingress replicas never
run jobs: restarting them touches no batch. Also here: batches past their completion window end `expired` (their
results so far kept), and files past their retention are deleted.
"""

import asyncio
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from ray import serve

from serve_app.batch.job import (PLAN_IMAGES_PER_GROUP, JobSpec, Outcome, cost, cost_bound, execute, plan_schema,
                                 validate)
from serve_app.batch.pipeline import READS_PER_EXECUTION, StagePipeline
from serve_app.batch.records import BatchRecords, dumps, now_s
from serve_app.batch.store import FileStore
from serve_app.config import BatchAPISettings, ImageLimits, ImageURLPolicy, ModelSpec, RequestLimits, TenancySettings
from serve_app.tenancy.gate import ENV_DATABASE_URL, ENV_KEYS_FILE, default_database_url
from serve_app.tenancy.metering import UsageRecord

logger = logging.getLogger("ray.serve")

DB_CALL_TIMEOUT_S = 60.0
EXPIRY_GRACE_S = 600


def database_url(tenancy: TenancySettings) -> str:
    """The batch records share the usage and credit records' database."""
    return tenancy.database_url or os.environ.get(ENV_DATABASE_URL) or default_database_url()


def job_spec(settings: BatchAPISettings, models: list[ModelSpec], image_limits: ImageLimits,
             limits: RequestLimits, url_policy: ImageURLPolicy, max_inputs: int, tenancy: TenancySettings,
             list_limits: tuple[int, int, int]) -> JobSpec:
    return JobSpec(
        endpoint="/v1/embeddings", models=models, image_limits=image_limits, limits=limits, url_policy=url_policy,
        max_inputs_per_request=max_inputs, max_requests_per_file=settings.max_requests_per_file,
        max_inputs_per_batch=settings.max_inputs_per_batch, max_line_bytes=limits.max_body_bytes,
        stages=settings.job, price=tenancy.price, prices=tenancy.prices, price_factor=settings.price_factor,
        list_limits=list_limits,
    )


def _job_thread(niceness: int, idle: bool) -> None:
    from serve_app.batch.dataset import lower_priority

    lower_priority(niceness, idle)


class _Stop(Exception):
    pass


class BatchWork:
    """Runs claimed batches, one at a time, against the records and the store (usable without Serve: tests)."""

    def __init__(self, settings: BatchAPISettings, spec: JobSpec, records: BatchRecords, store: FileStore,
                 keys_file: str | None) -> None:
        self.settings = settings
        self.spec = spec
        self.records = records
        self.store = store
        self.id = f"runner-{uuid.uuid4().hex[:12]}"
        self._keys = None
        if keys_file:
            from serve_app.tenancy.keys import KeysFile

            self._keys = KeysFile(keys_file)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Jobs run on a thread of their own, at the job's priority (Linux's is per thread): no other work of the
        # runner's inherits it.
        self._at_job_priority = partial(_job_thread, settings.job.niceness, settings.job.idle)
        self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-job",
                                        initializer=self._at_job_priority)
        self._last_sweep = -float("inf")
        self._stages: StagePipeline | None = None  # warm between batches; used on the job thread only

    # ------------------------------------------------------------ the loop

    async def run_forever(self) -> None:
        """The work loop, and beside it the retention sweep (a long batch does not hold deletions up)."""
        sweeper = asyncio.create_task(self._sweep_forever())
        try:
            while True:
                try:
                    if not await self.step():
                        await self._cool()
                        await asyncio.sleep(self.settings.poll_interval_s)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("batch runner step failed")
                    await asyncio.sleep(self.settings.poll_interval_s)
        finally:
            sweeper.cancel()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("retention sweep failed")
            await asyncio.sleep(self.settings.sweep_interval_s)

    async def step(self) -> bool:
        """One look for work; True when a batch was run."""
        row = await self.records.claim(self.id, self.settings.lease_s)
        if row is None:
            return False
        await self.run(row)
        return True

    async def _cool(self) -> None:
        """The warm stages let go after `keep_warm_s` without a batch: their actors hold CPUs (a GPU) meanwhile."""
        stages = self._stages
        if stages is not None and stages.idle_s() >= self.settings.keep_warm_s:
            await asyncio.get_running_loop().run_in_executor(self._jobs, self._close_stages)

    def _stages_for(self, model: str) -> StagePipeline:
        """The warm stages for `model`, started anew where there are none, they serve another model, they failed,
        or their execution has too few read tasks left for a whole batch."""
        stages = self._stages
        # every group but a batch's last holds PLAN_IMAGES_PER_GROUP inputs or more
        most_groups = math.ceil(self.spec.max_inputs_per_batch / PLAN_IMAGES_PER_GROUP) + 1
        if stages is not None and (not stages.alive or stages.model_name != model
                                   or stages.reads_left() < most_groups):
            self._close_stages()
            stages = None
        if stages is None:
            stages = self._stages = StagePipeline(self.spec, model, reads=max(READS_PER_EXECUTION, 4 * most_groups),
                                                  thread_init=self._at_job_priority)
            logger.info("batch stages for %s starting", model)
        return stages

    def _close_stages(self) -> None:
        stages, self._stages = self._stages, None
        if stages is not None:
            stages.close()
            logger.info("batch stages for %s stopped", stages.model_name)

    async def sweep(self) -> None:
        """Files past their retention deleted, rows first (a download that starts later finds no file), then
        their objects; until none is left."""
        while rows := await self.records.expired_files(now_s()):
            for row in rows:
                if await self.records.delete_file(None, row["id"]) is not None:
                    await asyncio.to_thread(self.store.delete, row["object_name"])
                    logger.info("file %s deleted (retention)", row["id"])

    # ------------------------------------------------------------ one batch

    async def run(self, row: dict[str, Any]) -> None:
        batch_id = row["id"]
        if row["attempts"] > self.settings.max_attempts:
            await self._fail(row, "job_failed", f"the batch's job stopped {self.settings.max_attempts} times")
            return
        if row["status"] == "cancelling":  # its runner died while stopping it: nothing of that run is kept
            await self.records.finish(batch_id, self.id, {"status": "cancelled", "cancelled_at": now_s()})
            return
        if now_s() >= row["expires_at"]:
            await self.records.finish(batch_id, self.id, {"status": "expired", "expired_at": now_s()})
            return
        self._loop = asyncio.get_running_loop()
        state = {"stop": None, "outcome": Outcome(), "done": False}
        beat = asyncio.create_task(self._heartbeat(batch_id, row["expires_at"], state))
        try:
            await asyncio.get_running_loop().run_in_executor(self._jobs, self._work_safely, row, state)
        except _Stop:
            pass
        except Exception as exc:
            logger.exception("batch %s: the job failed", batch_id)
            if row["attempts"] >= self.settings.max_attempts:
                await self._fail(row, "job_failed", f"the batch's job failed: {type(exc).__name__}: {exc}"[:500])
            else:  # its lease is let go: the next look runs it again
                await self.records.renew(batch_id, self.id, -self.settings.lease_s)
        finally:
            state["done"] = True
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)

    async def _heartbeat(self, batch_id: str, expires_at: int, state: dict[str, Any]) -> None:
        """Renews the lease and writes the counts; learns that the batch must stop (cancel, expiry, lease lost)."""
        interval = min(self.settings.poll_interval_s, self.settings.lease_s / 3)
        while not state["done"]:
            await asyncio.sleep(interval)
            outcome = state["outcome"]
            values = {"completed": outcome.completed, "failed": outcome.failed} if state.get("counting") else {}
            try:
                row = await self.records.renew(batch_id, self.id, self.settings.lease_s, **values)
            except Exception as exc:  # a database blip: the lease has some time left
                logger.warning("batch %s: lease not renewed: %s", batch_id, exc)
                continue
            if row is None:
                state["stop"] = "lost"
            elif row["status"] == "cancelling":
                state["stop"] = "cancelling"
            elif now_s() >= expires_at:
                state["stop"] = "expired"
                if now_s() >= expires_at + EXPIRY_GRACE_S:  # the job does not stop: let the lease lapse
                    logger.error("batch %s: its job did not stop at expiry; its lease is let go", batch_id)
                    return

    def _call(self, coroutine: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(DB_CALL_TIMEOUT_S)

    def _work_safely(self, row: dict[str, Any], state: dict[str, Any]) -> None:
        """`_work`, whose failures all reach the caller: a StopIteration crossing into the event loop would leave
        its future pending for ever."""
        try:
            self._work(row, state)
        except StopIteration as exc:
            raise RuntimeError(f"the job stopped: {exc!r}") from exc

    def _work(self, row: dict[str, Any], state: dict[str, Any]) -> None:
        """The job, in a thread: validation, the credit check, the run, the end."""
        import pyarrow.parquet as pq

        batch_id, base = row["id"], f"batches/{row['id']}"
        source = self._call(self.records.file(row["owner"], row["input_file_id"]))
        if source is None:
            self._call(self._fail(row, "file_not_found", "the input file was deleted before the batch ran"))
            return
        plan_name, output_name, errors_name = f"{base}/plan.parquet", f"{base}/output.jsonl", f"{base}/errors.jsonl"
        outcome: Outcome = state["outcome"]
        handed_on = False  # the outputs belong to `_end` once the run is over; else they are deleted here
        stopped_midway = False  # the run stopped with row groups in the stages: they are let go after `_end`
        try:
            with self.store.open_output(errors_name) as errors_out:
                with self.store.open_output(plan_name) as plan_stream:
                    writer = pq.ParquetWriter(plan_stream, plan_schema())
                    # the stages start (or stay warm) while the rest of the file is validated
                    validated = validate(self.store.lines(source["object_name"], self.spec.max_line_bytes),
                                         self.spec, writer, errors_out, on_first_input=self._stages_for)
                    writer.close()
                if validated.errors:
                    self._call(self.records.finish(batch_id, self.id, {
                        "status": "failed", "failed_at": now_s(), "errors": dumps(validated.errors),
                        "total": validated.total}))
                    return
                bound = cost_bound(self.spec, validated)
                short = self._call(self._credit_short(row["owner"], bound))
                if short:
                    self._call(self.records.finish(batch_id, self.id, {
                        "status": "failed", "failed_at": now_s(), "total": validated.total,
                        "errors": dumps([{"code": "insufficient_quota", "message": short, "param": None,
                                          "line": None}])}))
                    return
                outcome.failed = validated.failed
                started = self._call(self.records.start(
                    batch_id, self.id, self.settings.lease_s, in_progress_at=now_s(), total=validated.total,
                    failed=validated.failed, model=validated.model, held_nano_usd=bound))
                state["counting"] = True
                if started is None:
                    raise _Stop()
                with self.store.open_output(output_name) as output:
                    if validated.inputs and started["status"] == "in_progress":
                        stages = self._stages_for(validated.model)
                        try:
                            execute(stages, self.store.path(plan_name), self.store.filesystem, output, errors_out,
                                    lambda: state["stop"], outcome, self.settings.stall_timeout_s)
                            stopped_midway = outcome.stopped is not None
                        except Exception:
                            self._close_stages()  # the next batch starts them anew
                            raise
                    elif started["status"] != "in_progress":  # cancelled while it was validated
                        outcome.stopped = started["status"]
            handed_on = True
        finally:
            self.store.delete(plan_name)
            if not handed_on:
                self.store.delete(errors_name)
                self.store.delete(output_name)
        try:
            self._end(row, validated.model, outcome, state["stop"] or outcome.stopped, output_name, errors_name)
        finally:
            if stopped_midway:  # its row groups still in the stages are nobody's work now: they are dropped
                self._close_stages()

    def _end(self, row: dict[str, Any], model: str | None, outcome: Outcome, stop: str | None, output_name: str,
             errors_name: str) -> None:
        batch_id = row["id"]
        if stop == "lost":  # another runner has the batch now: nothing of this run is written
            raise _Stop()
        now = now_s()
        if stop is None:
            self._call(self.records.renew(batch_id, self.id, self.settings.lease_s, status="finalizing",
                                          finalizing_at=now, completed=outcome.completed, failed=outcome.failed))
        final = {"cancelling": ("cancelled", "cancelled_at"), "expired": ("expired", "expired_at")}.get(
            stop or "", ("completed", "completed_at"))
        expires = now + int(self.settings.retention_days * 86400)
        files = []
        values: dict[str, Any] = {"status": final[0], final[1]: now_s(), "completed": outcome.completed,
                                  "failed": outcome.failed, "input_tokens": outcome.input_tokens,
                                  "images": outcome.images}
        for name, count, column, filename in ((output_name, outcome.completed, "output_file_id", "output"),
                                              (errors_name, outcome.failed, "error_file_id", "errors")):
            if not count:
                self.store.delete(name)
                continue
            file_id = "file-" + uuid.uuid4().hex
            files.append({"id": file_id, "owner": row["owner"], "purpose": "batch_output",
                          "filename": f"{batch_id}_{filename}.jsonl", "bytes": self.store.size(name), "lines": count,
                          "created_at": now, "expires_at": expires, "object_name": name})
            values[column] = file_id
        usage = None
        if row["owner"] and (outcome.input_tokens or outcome.images):
            usage = UsageRecord(request_id=batch_id, key_id=row["owner"], model=model or "", route="/v1/batches",
                                input_tokens=outcome.input_tokens, images=outcome.images, status=200,
                                cost_nano_usd=cost(self.spec, model, outcome.input_tokens, outcome.images),
                                created_at=time.time())
        if not self._call(self.records.finish(batch_id, self.id, values, usage, files)):
            raise _Stop()  # the lease was lost meanwhile: the next run writes the batch's end
        logger.info("batch %s %s: %d completed, %d failed", batch_id, final[0], outcome.completed, outcome.failed)

    async def _credit_short(self, owner: str, bound: int) -> str | None:
        """Why the key's credit cannot hold the batch's bound, or None. Credit is the keys file's grant plus the
        admin top-ups, less what is spent and what its other unfinished batches hold."""
        if not owner or self._keys is None:
            return None
        self._keys.reload_if_changed()
        key = self._keys.ring.keys.get(owner)
        if key is None or key.credit_nano_usd is None:
            return None
        left = key.credit_nano_usd + await self.records.credit_left(owner)
        if bound <= left:
            return None
        return (f"this batch may cost up to {bound / 1e9:.6f} USD and the key has {max(left, 0) / 1e9:.6f} USD of "
                "credit left; add credit or send a smaller batch")

    async def _fail(self, row: dict[str, Any], code: str, message: str) -> None:
        await self.records.finish(row["id"], None, {
            "status": "failed", "failed_at": now_s(),
            "errors": dumps([{"code": code, "message": message, "param": None, "line": None}])})


# Ray options come from `batch.runner` (serve_app/config.py), applied by build_app.
@serve.deployment
class BatchRunner:
    """The Serve deployment around `BatchWork`: one loop per replica, started with the replica."""

    def __init__(self, settings: BatchAPISettings, models: list[ModelSpec], image_limits: ImageLimits,
                 limits: RequestLimits, url_policy: ImageURLPolicy, max_inputs: int, tenancy: TenancySettings,
                 list_limits: tuple[int, int, int]) -> None:
        spec = job_spec(settings, models, image_limits, limits, url_policy, max_inputs, tenancy, list_limits)
        self.work = BatchWork(settings, spec, BatchRecords(database_url(tenancy)), FileStore(settings.storage),
                              tenancy.keys_file or os.environ.get(ENV_KEYS_FILE))
        self._task: asyncio.Task | None = None
        self._ensure_started()

    def _ensure_started(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # the first health check starts it
        if self._task is None or self._task.done():
            self._task = loop.create_task(self.work.run_forever())

    async def check_health(self) -> None:
        self._ensure_started()

    async def info(self) -> dict[str, Any]:
        return {"runner": self.work.id, "pid": os.getpid()}

