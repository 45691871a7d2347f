"""Wire types of the Files and Batch API, as the openai SDK's `FileObject` and `Batch` (openai-python's types)."""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from serve_app.protocol import WireModel

WINDOW_SECONDS = {"24h": 24 * 3600}


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> "FileObject":
        return cls(id=row["id"], bytes=row["bytes"], created_at=row["created_at"], expires_at=row["expires_at"],
                   filename=row["filename"], purpose=row["purpose"])


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchUsage(BaseModel):
    """OpenAI's batch usage: embeddings have input tokens only."""

    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int = 0
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int
    # --- extensions ---
    images: int = 0


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: BatchUsage | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> "Batch":
        errors = json.loads(row["errors"]) if row.get("errors") else None
        tokens = row["input_tokens"]
        return cls(
            **{k: row[k] for k in (
                "id", "endpoint", "input_file_id", "completion_window", "status", "output_file_id", "error_file_id",
                "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                "expired_at", "cancelling_at", "cancelled_at", "model")},
            errors=BatchErrors(data=[BatchError(**e) for e in errors]) if errors else None,
            request_counts=BatchRequestCounts(total=row["total"], completed=row["completed"], failed=row["failed"]),
            metadata=json.loads(row["metadata"]) if row.get("metadata") else None,
            usage=BatchUsage(input_tokens=tokens, total_tokens=tokens, images=row["images"])
            if row["status"] in ("completed", "cancelled", "expired") else None,
        )


class ListPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchCreate(WireModel):
    input_file_id: str = Field(max_length=128)
    endpoint: Literal["/v1/embeddings"] = Field(description="the only endpoint batches serve here")
    completion_window: Literal["24h"]
    # OpenAI's bounds: 16 pairs, keys up to 64 characters, values up to 512
    metadata: dict[Annotated[str, StringConstraints(max_length=64)],
                   Annotated[str, StringConstraints(max_length=512)]] | None = Field(default=None, max_length=16)
