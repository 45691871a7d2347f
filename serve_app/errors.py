"""The project's exceptions and the one place that turns any exception into an OpenAI error body.

Deployments raise these (never HTTP framework exceptions); they survive the hop between Ray Serve
deployments and the ingress maps them with `error_payload`. A 500 says "internal error" and the request
id, never a stack trace.
"""

import math
import sys
from dataclasses import dataclass, field
from typing import Any


class ServeAppError(Exception):
    """Base of every error a client may see; `status_code` is the HTTP status."""

    status_code: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive pickling by default; Ray pickles exceptions between replicas.
        return (_rebuild, (type(self), self.message, self.param))


def _rebuild(cls: type[ServeAppError], message: str, param: str | None) -> ServeAppError:
    return cls(message, param=param)


class InvalidRequest(ServeAppError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(ServeAppError):
    status_code = 404
    error_type = "invalid_request_error"


class PayloadTooLarge(ServeAppError):
    status_code = 413
    error_type = "invalid_request_error"


class Overloaded(ServeAppError):
    status_code = 429
    error_type = "rate_limit_error"


class Unavailable(ServeAppError):
    status_code = 503
    error_type = "server_error"


class DeadlineExceeded(ServeAppError):
    """The server's own deadline for a request passed (`request_timeout_s`)."""

    status_code = 504
    error_type = "server_error"


@dataclass(frozen=True)
class MappedError:
    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # why the request was refused, for the rejections metric (None: not a rejection)


def find_app_error(exc: BaseException) -> ServeAppError | None:
    """Finds our own error inside whatever Ray wrapped it in (RayTaskError keeps it as `.cause`)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ServeAppError):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return None


def _ray_overload(exc: BaseException) -> MappedError | None:
    """Ray Serve's refusals raised by an inner pool's handle: its queue is full (`BackPressureError`, with the
    pool's `backpressure_config`), or it has no replica to take the call (`DeploymentUnavailableError`)."""
    if "ray.serve" not in sys.modules:  # nothing of Ray's can be in flight
        return None
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BackPressureError):
            status = current.status_code if current.status_code in (429, 503) else 503
            headers = {}
            if current.retry_after_s is not None:
                headers["Retry-After"] = str(max(1, math.ceil(current.retry_after_s)))
            error_type = Overloaded.error_type if status == 429 else Unavailable.error_type
            message = "The service is overloaded: too many requests are queued. Retry after a moment."
            mapped = error_body(status, message, error_type)
            return MappedError(mapped.status_code, mapped.body, headers, "backpressure")
        if isinstance(current, DeploymentUnavailableError):
            mapped = error_body(503, "The service has no replica ready for this request; retry later.", "server_error")
            return MappedError(mapped.status_code, mapped.body, {"Retry-After": "1"}, "unavailable")
        current = getattr(current, "cause", None) or current.__cause__
    return None


def error_payload(exc: BaseException, request_id: str | None = None) -> MappedError:
    """Maps any exception to (status, {"error": {message, type, param, code}}); `code` is the status."""
    app_error = find_app_error(exc)
    if app_error is None:
        overload = _ray_overload(exc)
        if overload is not None:
            return overload
        message = "Internal error" + (f" (request id {request_id})" if request_id else "")
        return error_body(500, message, "server_error")
    mapped = error_body(app_error.status_code, app_error.message, app_error.error_type, app_error.param)
    if isinstance(app_error, DeadlineExceeded):
        return MappedError(mapped.status_code, mapped.body, reason="timeout")
    return mapped


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> MappedError:
    return MappedError(
        status, {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    )
