"""Wire types of the Files and Batch API, as the openai SDK's `FileObject` and `Batch` (openai-python's types)."""

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from serve_app.protocol import WireModel

BATCH_ENDPOINTS = ("/v1/embeddings",)
COMPLETION_WINDOWS = ("24h",)
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
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value not in BATCH_ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)} on this server")
        return value

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if value not in COMPLETION_WINDOWS:
            raise ValueError(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        """OpenAI's bounds: 16 pairs, keys up to 64 characters, values up to 512."""
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("metadata holds at most 16 key-value pairs")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys are at most 64 characters and values at most 512")
        return value
