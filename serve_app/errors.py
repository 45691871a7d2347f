"""The project's exceptions and the one place that turns any exception into an OpenAI error body.

Deployments raise these (never HTTP framework exceptions); they survive the hop between Ray Serve
deployments and the ingress maps them with `error_payload`. A 500 says "internal error" and the request
id, never a stack trace.
"""

from dataclasses import dataclass
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


class RequestTimeout(ServeAppError):
    status_code = 408
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


@dataclass(frozen=True)
class MappedError:
    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


RETRY_AFTER_S = 1

# Ray's own failures that a retry may cure: a full queue (429), a replica that died or is being replaced (503).
_OVERLOADED = ("BackPressureError",)
_UNAVAILABLE = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "DeploymentUnavailableError",
                "ReplicaUnavailableError", "WorkerCrashedError", "NodeDiedError")


def _ray_failure(exc: BaseException) -> type[ServeAppError] | None:
    """Overloaded or Unavailable when `exc` (or what it wraps) is one of Ray's retryable failures."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if names & set(_OVERLOADED):
            return Overloaded
        if names & set(_UNAVAILABLE):
            return Unavailable
        current = getattr(current, "cause", None) or current.__cause__
    return None


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


def error_payload(exc: BaseException, request_id: str | None = None) -> MappedError:
    """Maps any exception to (status, {"error": {message, type, param, code}}); `code` is the status."""
    app_error = find_app_error(exc)
    if app_error is None:
        failure = _ray_failure(exc)
        if failure is not None:  # retryable: say when (clients such as the openai SDK honour Retry-After)
            message = ("the service is busy; retry" if failure is Overloaded
                       else "a replica of the service is restarting; retry")
            mapped = error_body(failure.status_code, message, failure.error_type)
            return MappedError(mapped.status_code, mapped.body, {"Retry-After": str(RETRY_AFTER_S)})
        message = "Internal error" + (f" (request id {request_id})" if request_id else "")
        return error_body(500, message, "server_error")
    mapped = error_body(app_error.status_code, app_error.message, app_error.error_type, app_error.param)
    if app_error.status_code in (429, 503):
        return MappedError(mapped.status_code, mapped.body, {"Retry-After": str(RETRY_AFTER_S)})
    return mapped


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> MappedError:
    return MappedError(
        status, {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    )
