"""Configuration validation, deployment options, and the one error mapper."""

import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.app import build_app
from serve_app.config import DEFAULT_MODEL, AppArgs, ModelSpec, PoolSettings
from serve_app.errors import InvalidRequest, ModelNotFound, PayloadTooLarge, error_payload


def test_default_model_is_vit_g_14_served_under_its_repo_id():
    spec = AppArgs().model_specs()[0]
    assert spec.model == DEFAULT_MODEL == "hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K"
    assert spec.name == "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"


def test_served_names_for_each_kind_of_model_id(tmp_path: Path):
    assert ModelSpec(model="ViT-B-32", pretrained="openai").name == "ViT-B-32/openai"
    assert ModelSpec(model=f"local-dir:{tmp_path}/m").name == "m"
    assert ModelSpec(model="ViT-B-32", served_model_name="b32").name == "b32"


def test_local_dir_paths_are_made_absolute():
    spec = ModelSpec(model="local-dir:some/rel")
    assert spec.model == f"local-dir:{Path('some/rel').resolve()}"


def test_cli_strings_are_coerced_and_flat_fields_reach_the_model_spec():
    args = AppArgs.model_validate({"model": "ViT-B-32", "max_batch_size": "16", "torch_threads": "2"})
    spec = args.model_specs()[0]
    assert spec.batching.max_batch_size == 16 and spec.torch_threads == 2


def test_unknown_keys_and_duplicate_names_are_configuration_errors():
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"modle": "typo"})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"models": [{"model": "ViT-B-32"}, {"model": "ViT-B-32"}]})


def test_pool_settings_become_deployment_options():
    pool = PoolSettings(autoscaling_config={"min_replicas": 1, "max_replicas": 4}, num_gpus=1, num_cpus=2,
                        max_ongoing_requests=128, env_vars={"A": "1"})
    assert pool.deployment_options() == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 4},
        "max_ongoing_requests": 128,
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 1, "runtime_env": {"env_vars": {"A": "1"}}},
    }
    encoder = ModelSpec(model="ViT-B-32", device="cuda", encoder={"num_cpus": 2, "env_vars": {"B": "2"}})
    assert encoder.encoder_options["ray_actor_options"] == {
        "num_cpus": 2, "num_gpus": 1, "runtime_env": {"env_vars": {"B": "2"}}
    }
    with pytest.raises(ValidationError):
        PoolSettings(num_replicas=2, autoscaling_config={"max_replicas": 3})


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


def test_gpus_per_encoder_follow_the_device_unless_configured():
    assert ModelSpec(model="ViT-B-32").encoder_gpus == 0
    assert ModelSpec(model="ViT-B-32", device="cuda").encoder_gpus == 1
    assert ModelSpec(model="ViT-B-32", device="auto", encoder={"num_gpus": 0.5}).encoder_gpus == 0.5
    with pytest.raises(ValidationError, match="num_gpus"):
        ModelSpec(model="ViT-B-32", device="cuda", encoder={"num_gpus": 0})
    with pytest.raises(ValidationError, match="num_gpus"):
        AppArgs.model_validate({"device": "cuda", "encoder": {"num_gpus": 0}})


def test_default_pools_fit_a_two_cpu_laptop():
    """Ray counts logical CPUs: defaults over 2 would leave a replica unscheduled on a 2-core machine."""
    args = AppArgs()
    reserved = args.preprocessor.num_cpus + args.ingress.num_cpus + sum(s.encoder.num_cpus for s in args.model_specs())
    assert reserved <= 2


def test_one_process_layout_is_one_model_on_the_cpu_with_the_encoder_pool_settings():
    args = AppArgs.model_validate({"layout": "one-process", "encoder": {"num_replicas": 2, "num_cpus": 1.5}})
    app = build_app(args)
    deployment = app._bound_deployment
    assert deployment.name == "OpenAIIngress"
    assert deployment.num_replicas == 2 and deployment.ray_actor_options["num_cpus"] == 1.5
    assert deployment.ray_actor_options["num_gpus"] == 0
    assert AppArgs().layout == "pools"
    with pytest.raises(ValidationError, match="remove ingress and preprocessor"):
        AppArgs.model_validate({"layout": "one-process", "ingress": {"num_cpus": 1}, "preprocessor": {"num_cpus": 1}})
    with pytest.raises(ValidationError, match="serves one model"):
        AppArgs.model_validate({"layout": "one-process", "models": [{"served_model_name": "a"}, {"served_model_name": "b"}]})
    with pytest.raises(ValidationError, match="CPU-only"):
        AppArgs.model_validate({"layout": "one-process", "device": "cuda"})
    with pytest.raises(ValidationError, match="layout"):
        AppArgs.model_validate({"layout": "one-box"})
