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
