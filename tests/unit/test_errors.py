"""The project's exceptions cross Ray hops as themselves; the one mapper gives OpenAI's error shape."""

import pickle

from serve_app.errors import InvalidRequest, ModelNotFound, PayloadTooLarge, error_payload


def test_errors_survive_pickling_as_their_own_class():
    error = pickle.loads(pickle.dumps(PayloadTooLarge("too big", param="input[2]")))
    assert type(error) is PayloadTooLarge and error.param == "input[2]" and error.status_code == 413


class FakeRayTaskError(Exception):
    """Shaped like ray.exceptions.RayTaskError: the original exception is `.cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("wrapped")
        self.cause = cause


def test_error_mapper_unwraps_and_uses_openai_shape():
    mapped = error_payload(FakeRayTaskError(ModelNotFound("no such model", param="model")))
    assert mapped.status_code == 404
    assert mapped.body == {
        "error": {"message": "no such model", "type": "invalid_request_error", "param": "model", "code": 404}
    }
    assert error_payload(InvalidRequest("bad")).status_code == 400


def test_unexpected_errors_are_500_without_details():
    mapped = error_payload(RuntimeError("secret stack detail"), request_id="abc123")
    assert mapped.status_code == 500
    assert "secret" not in mapped.body["error"]["message"]
    assert "abc123" in mapped.body["error"]["message"]


def test_rays_refusals_from_an_inner_pool_become_429_or_503_with_retry_after():
    from ray.serve.exceptions import BackPressureError

    mapped = error_payload(FakeRayTaskError(BackPressureError(10, 10, status_code=429, retry_after_s=1.5)))
    assert mapped.status_code == 429 and mapped.headers == {"Retry-After": "2", "retry-after-ms": "1500"} and mapped.reason == "backpressure"
    assert mapped.body["error"]["type"] == "rate_limit_error" and mapped.body["error"]["code"] == 429
    plain = error_payload(BackPressureError(3, 3))  # Ray's default status, 503; every 503 says when to retry
    assert plain.status_code == 503 and plain.headers["Retry-After"] == "1" and plain.reason == "unavailable"


def test_the_servers_deadline_is_504_and_counts_as_a_rejection():
    from serve_app.errors import DeadlineExceeded

    mapped = error_payload(DeadlineExceeded("late"))
    assert mapped.status_code == 504 and mapped.reason == "timeout" and mapped.body["error"]["message"] == "late"


def test_ray_failures_map_to_retryable_statuses():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    busy = error_payload(BackPressureError(num_queued_requests=10, max_queued_requests=10, status_code=429))
    assert busy.status_code == 429 and busy.headers == {"Retry-After": "1", "retry-after-ms": "1000"}
    assert busy.body["error"]["type"] == "rate_limit_error"
    died = error_payload(ActorDiedError())
    assert died.status_code == 503 and died.headers["Retry-After"] == "1"
    wrapped = RuntimeError("outer")
    wrapped.__cause__ = DeploymentUnavailableError("ClipEncoder")
    assert error_payload(wrapped).status_code == 503


def test_own_errors_keep_their_status_and_only_retryable_ones_say_when():
    from serve_app.errors import Overloaded, Unavailable

    assert error_payload(Overloaded("busy")).headers == {"Retry-After": "1", "retry-after-ms": "1000"}
    assert error_payload(Unavailable("down")).headers == {"Retry-After": "1", "retry-after-ms": "1000"}
    assert error_payload(InvalidRequest("bad", param="input")).headers == {}
    internal = error_payload(ValueError("secret detail"), "req-1")
    assert internal.status_code == 500 and "secret" not in internal.body["error"]["message"]
