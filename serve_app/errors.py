"""The project's exceptions and the one place that turns any exception into an OpenAI error body.

Deployments raise these (never HTTP framework exceptions); they survive the hop between Ray Serve
deployments and the ingress maps them with `error_payload`. A 500 says "internal error" and the request
id, never a stack trace.
"""

import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class ServeAppError(Exception):
    """Base of every error a client may see; `status_code` is the HTTP status."""

    status_code: int = 500
    error_type: str = "server_error"

    reason: str | None = None  # why a request was refused, for the rejections metric (None: not a refusal)
    code: str | None = None  # OpenAI's `code` where it names one (`rate_limit_exceeded`); else the status

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s: float | None = None  # sent as Retry-After
        self.headers: dict[str, str] = {}  # more headers of the answer (rate-limit state)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive pickling by default; Ray pickles exceptions between replicas.
        return (_rebuild, (type(self), self.message, self.param))


def _rebuild(cls: type[ServeAppError], message: str, param: str | None) -> ServeAppError:
    return cls(message, param=param)


class InvalidRequest(ServeAppError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFound(ServeAppError):
    status_code = 404
    error_type = "invalid_request_error"


class ModelNotFound(NotFound):
    pass


class RequestTimeout(ServeAppError):
    status_code = 408
    error_type = "invalid_request_error"
    reason = "slow_body"


class PayloadTooLarge(ServeAppError):
    status_code = 413
    error_type = "invalid_request_error"
    reason = "too_large"


class Overloaded(ServeAppError):
    status_code = 429
    error_type = "rate_limit_error"
    reason = "backpressure"


class TooManyInFlight(Overloaded):
    """The ingress's own admission bound (`limits.max_requests_in_flight`)."""

    reason = "overloaded"


class Unauthorized(ServeAppError):
    status_code = 401
    error_type = "invalid_request_error"
    reason = "unauthorized"
    code = "invalid_api_key"


class Forbidden(ServeAppError):
    """A valid key on a route it may not use (an ordinary key on the admin routes, an admin key on the API)."""

    status_code = 403
    error_type = "invalid_request_error"
    reason = "forbidden"
    code = "insufficient_permissions"


class RateLimited(ServeAppError):
    """A key over one of its per-minute limits; `error_type` is the limit's kind, as OpenAI's
    (`requests`, `tokens`; `images` is ours)."""

    status_code = 429
    reason = "rate_limited"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str = "requests") -> None:
        super().__init__(message)
        self.error_type = kind


class QuotaExceeded(ServeAppError):
    """A key whose credit is spent: retrying does not help, and says so (`x-should-retry: false` stops the
    openai SDK's retries)."""

    status_code = 429
    error_type = "insufficient_quota"
    reason = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.headers = {"x-should-retry": "false"}


class TooManyBatches(ServeAppError):
    """A key's unfinished batches are at `batch.max_active_batches_per_key`."""

    status_code = 429
    error_type = "invalid_request_error"
    code = "batch_limit_exceeded"
    reason = "batch_limit"


class StorageQuotaExceeded(ServeAppError):
    """A key keeps `batch.max_files_per_key` files, or an upload would pass `max_stored_bytes_per_key`."""

    status_code = 429
    error_type = "invalid_request_error"
    code = "storage_quota_exceeded"
    reason = "storage_quota"


class Unavailable(ServeAppError):
    status_code = 503
    error_type = "server_error"


class PoolUnavailable(Unavailable):
    """A pool refused a call: its queue is full and it answers 503, or it has no replica to take it."""

    reason = "unavailable"


class DeadlineExceeded(ServeAppError):
    """The server's own deadline for a request passed (`request_timeout_s`)."""

    status_code = 504
    error_type = "server_error"
    reason = "timeout"


@dataclass(frozen=True)
class MappedError:
    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # why the request was refused, for the rejections metric (None: not a rejection)


# Every 429 and 503 says when to retry (clients such as the openai SDK honour Retry-After).
RETRY_AFTER_S = 1

# Ray's failures that a retry may cure: a replica that died or is being replaced (503).
_UNAVAILABLE = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "DeploymentUnavailableError",
                "ReplicaUnavailableError", "WorkerCrashedError", "NodeDiedError")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps, outermost first: Ray's RayTaskError keeps the original as `.cause`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "cause", None) or current.__cause__


def _replica_lost(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is one of Ray's failures of a replica that a retry may cure."""
    return any({cls.__name__ for cls in type(e).__mro__} & set(_UNAVAILABLE) for e in _chain(exc))


def find_app_error(exc: BaseException) -> ServeAppError | None:
    """Finds our own error inside whatever Ray wrapped it in."""
    return next((e for e in _chain(exc) if isinstance(e, ServeAppError)), None)


def pool_refusal(exc: BaseException) -> ServeAppError | None:
    """Ray Serve's refusal of a call to an inner pool, as our own error: its queue is full
    (`BackPressureError`, with the pool's `backpressure_config`: 429 or 503 and Retry-After), or it has no
    replica to take the call (`DeploymentUnavailableError`: 503). None for anything else.

    The caller raises it instead: Ray installs FastAPI handlers of its own for these two classes, which would
    answer in plain text before the error mapper saw them."""
    if "ray.serve" not in sys.modules:  # nothing of Ray's can be in flight
        return None
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    for current in _chain(exc):
        if isinstance(current, BackPressureError):
            message = "The service is overloaded: too many requests are queued. Retry after a moment."
            error: ServeAppError = Overloaded(message) if current.status_code == 429 else PoolUnavailable(message)
            error.retry_after_s = current.retry_after_s
            return error
        if isinstance(current, DeploymentUnavailableError):
            return PoolUnavailable("The service has no replica ready for this request; retry later.")
    return None


def _message_too_large(exc: BaseException) -> ServeAppError | None:
    """gRPC's refusal of a call between deployments larger than RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH."""
    if any("Received message larger than max" in str(e) for e in _chain(exc)):
        return PayloadTooLarge("the request's data is larger than this service passes between its pools; send "
                               "fewer or smaller images per request")
    return None


def error_payload(exc: BaseException, request_id: str | None = None) -> MappedError:
    """Maps any exception to (status, {"error": {message, type, param, code}}); `code` is the status."""
    app_error = find_app_error(exc) or pool_refusal(exc) or _message_too_large(exc)
    if app_error is None and _replica_lost(exc):
        app_error = PoolUnavailable("a replica of the service is restarting; retry")
    if app_error is None:
        message = "Internal error" + (f" (request id {request_id})" if request_id else "")
        return error_body(500, message, "server_error")
    mapped = error_body(app_error.status_code, app_error.message, app_error.error_type, app_error.param,
                        app_error.code)
    headers = dict(getattr(app_error, "headers", None) or {})
    retry_after = app_error.retry_after_s
    if retry_after is None and app_error.status_code in (429, 503) and not isinstance(app_error, QuotaExceeded):
        retry_after = RETRY_AFTER_S
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        headers["retry-after-ms"] = str(max(1, math.ceil(retry_after * 1000)))
    return MappedError(mapped.status_code, mapped.body, headers, app_error.reason)


def error_body(status: int, message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> MappedError:
    return MappedError(
        status, {"error": {"message": message, "type": error_type, "param": param, "code": code or status}}
    )


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'input', 'list[...]', 3, 'image-part', 'image_url', 'ImageURL') -> 'input[3].image_url'.

    pydantic adds union branches to locations (type names, class names, our hyphenated tags); only
    field names (lower-case identifiers) and indexes name what the client sent.
    """
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part[0].islower() and part not in _TYPE_NAMES:
            param += ("." if param else "") + part
    return param or None


def validation_failure(errors: list[dict[str, Any]]) -> MappedError:
    """A request body's validation errors (pydantic's) as one 400 naming the offending item: the online routes'
    answer and a batch line's alike."""
    # Union types fail once per branch; the deepest location names the offending item best (input[3]).
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={"loc": (), "msg": "invalid request"})
    if first.get("type") == "json_invalid":
        return error_body(400, "request body is not valid JSON", "invalid_request_error")
    param = param_from_loc(tuple(first.get("loc", ())))
    messages = "; ".join(dict.fromkeys([str(first.get("msg"))] + [str(e.get("msg")) for e in errors[:4]]))
    message = f"invalid value for `{param}`: {messages}" if param else f"invalid request: {messages}"
    if param is None and first.get("type") == "missing":
        message = "request body is required (JSON)"
    return error_body(400, message, "invalid_request_error", param)
