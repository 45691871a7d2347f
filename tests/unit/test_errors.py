"""Ray's retryable failures leave as 429/503 with Retry-After; our own 429/503 carry it too (no Ray started)."""

from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from serve_app.errors import InvalidRequest, Overloaded, Unavailable, error_payload


def test_ray_failures_map_to_retryable_statuses():
    busy = error_payload(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    assert busy.status_code == 429 and busy.headers == {"Retry-After": "1"}
    assert busy.body["error"]["type"] == "rate_limit_error"
    died = error_payload(ActorDiedError())
    assert died.status_code == 503 and died.headers == {"Retry-After": "1"}
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = DeploymentUnavailableError("ClipEncoder")
    assert error_payload(wrapped).status_code == 503


def test_own_errors_keep_their_status_and_only_retryable_ones_say_when():
    assert error_payload(Overloaded("busy")).headers == {"Retry-After": "1"}
    assert error_payload(Unavailable("down")).headers == {"Retry-After": "1"}
    assert error_payload(InvalidRequest("bad", param="input")).headers is None
    internal = error_payload(ValueError("secret detail"), "req-1")
    assert internal.status_code == 500 and "secret" not in internal.body["error"]["message"]
