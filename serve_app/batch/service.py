"""The ingress's side of the Files and Batch API: records and bytes in, OpenAI's objects out. No job runs here
(serve_app/batch/runner.py does): an ingress replica that restarts loses nothing.

Every file and batch belongs to the key that created it (its id; "" on a service without keys): another key's
is "not found", as if it did not exist.
"""

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

from serve_app.batch.protocol import (
    WINDOW_SECONDS, Batch, BatchCreate, FileDeleted, FileObject, ListPage,
)
from serve_app.batch.records import TERMINAL, BatchRecords, dumps, now_s
from serve_app.batch.store import FileStore
from serve_app.config import BatchAPISettings
from serve_app.errors import InvalidRequest, NotFound, PayloadTooLarge, StorageQuotaExceeded, TooManyBatches
from serve_app.tenancy import gate as tenancy_gate

MAX_FILENAME_CHARS = 256


def owner() -> str:
    """The key the request came with (tenancy); "" on a service without keys."""
    tenant = tenancy_gate.CURRENT.get()
    return tenant.key.id if tenant is not None else ""


class BatchAPI:
    def __init__(self, settings: BatchAPISettings, database_url: str) -> None:
        self.settings = settings
        self.records = BatchRecords(database_url)
        self.store = FileStore(settings.storage)

    # ------------------------------------------------------------ files

    async def upload(self, form: Any) -> FileObject:
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            raise InvalidRequest("purpose must be `batch` (the only purpose this server stores files for)",
                                 param="purpose")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("`file` is required: a .jsonl file as multipart form data", param="file")
        filename = (upload.filename or "").rsplit("/", 1)[-1][:MAX_FILENAME_CHARS]
        if not filename.endswith(".jsonl"):
            raise InvalidRequest("the batch input file must be a .jsonl file", param="file")
        files, stored = await self.records.stored(owner())
        if files >= self.settings.max_files_per_key:
            raise StorageQuotaExceeded(f"this key keeps {files} files, the most it may; delete some first")
        file_id = "file-" + uuid.uuid4().hex
        name = f"files/{file_id}"
        try:
            size, lines = await asyncio.to_thread(self._copy, upload.file, name)
        except BaseException:  # no row names a partial object: it goes now or never
            await asyncio.to_thread(self.store.delete, name)
            raise
        if stored + size > self.settings.max_stored_bytes_per_key:
            await asyncio.to_thread(self.store.delete, name)
            raise StorageQuotaExceeded(f"this key keeps {stored} bytes of files; this one would pass its "
                                       f"{self.settings.max_stored_bytes_per_key} byte quota: delete some first")
        if size == 0:
            await asyncio.to_thread(self.store.delete, name)
            raise InvalidRequest("the file is empty", param="file")
        if lines > self.settings.max_requests_per_file:
            await asyncio.to_thread(self.store.delete, name)
            raise InvalidRequest(f"the file has {lines} lines; a batch takes at most "
                                 f"{self.settings.max_requests_per_file} requests", param="file")
        now = now_s()
        row = {"id": file_id, "owner": owner(), "purpose": "batch", "filename": filename, "bytes": size,
               "lines": lines, "created_at": now, "expires_at": now + int(self.settings.retention_days * 86400),
               "object_name": name}
        try:
            await self.records.add_file(row)
        except BaseException:
            await asyncio.to_thread(self.store.delete, name)
            raise
        return FileObject.of(row)

    def _copy(self, source: Any, name: str) -> tuple[int, int]:
        """(bytes, lines): the upload copied into the store, counted as it goes."""
        size = lines = 0
        last = b"\n"
        with self.store.open_output(name) as out:
            while chunk := source.read(1 << 20):
                size += len(chunk)
                if size > self.settings.max_file_bytes:
                    raise PayloadTooLarge(f"the file is larger than {self.settings.max_file_bytes} bytes",
                                          param="file")
                lines += chunk.count(b"\n")
                last = chunk[-1:]
                out.write(chunk)
        return size, lines + (last != b"\n")

    async def file(self, file_id: str) -> FileObject:
        return FileObject.of(await self._file(file_id))

    async def _file(self, file_id: str) -> dict[str, Any]:
        row = await self.records.file(owner(), file_id)
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="id")
        return row

    async def files(self, purpose: str | None, after: str | None, limit: int, order: str) -> ListPage:
        rows = await self.records.files(owner(), purpose, after, limit, order)
        return _page([FileObject.of(r) for r in rows[:limit]], len(rows) > limit)

    async def content(self, file_id: str) -> Iterator[bytes]:
        row = await self._file(file_id)
        return self.store.chunks(row["object_name"])

    async def delete(self, file_id: str) -> FileDeleted:
        row = await self.records.delete_file(owner(), file_id)
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="id")
        await asyncio.to_thread(self.store.delete, row["object_name"])
        return FileDeleted(id=file_id)

    # ------------------------------------------------------------ batches

    async def create(self, request: BatchCreate) -> Batch:
        source = await self.records.file(owner(), request.input_file_id)
        if source is None:
            raise NotFound(f"No such File object: {request.input_file_id}", param="input_file_id")
        if source["purpose"] != "batch":
            raise InvalidRequest("the input file's purpose must be `batch`", param="input_file_id")
        now = now_s()
        row = {
            "id": "batch_" + uuid.uuid4().hex, "owner": owner(), "endpoint": request.endpoint,
            "input_file_id": request.input_file_id, "completion_window": request.completion_window,
            "status": "validating", "metadata": dumps(request.metadata) if request.metadata else None,
            "created_at": now, "expires_at": now + WINDOW_SECONDS[request.completion_window],
            "total": 0, "completed": 0, "failed": 0, "input_tokens": 0, "images": 0, "held_nano_usd": 0,
            "lease_until_us": 0, "attempts": 0,
        }
        if not await self.records.add_batch(row, self.settings.max_active_batches_per_key):
            raise TooManyBatches(f"this key has {self.settings.max_active_batches_per_key} batches in progress; "
                                 "wait for one to finish")
        return Batch.of(await self.records.batch(owner(), row["id"]))

    async def batch(self, batch_id: str) -> Batch:
        row = await self.records.batch(owner(), batch_id)
        if row is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return Batch.of(row)

    async def batches(self, after: str | None, limit: int) -> ListPage:
        rows = await self.records.batches(owner(), after, limit)
        return _page([Batch.of(r) for r in rows[:limit]], len(rows) > limit)

    async def cancel(self, batch_id: str) -> Batch:
        row = await self.records.request_cancel(owner(), batch_id)
        if row is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        if row["status"] in TERMINAL and row["status"] != "cancelled":
            raise InvalidRequest(f"the batch is {row['status']}: only a batch in progress can be cancelled",
                                 param="batch_id")
        return Batch.of(row)


def _page(data: list[Any], has_more: bool) -> ListPage:
    return ListPage(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                    has_more=has_more)
