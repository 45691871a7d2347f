"""Configuration validation and deployment options: YAML/CLI args -> AppArgs -> Ray options."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.app import build_app
from serve_app.config import DEFAULT_MODEL, POOL_DEFAULTS, AppArgs, ModelSpec, PoolSettings


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


def test_a_partial_pool_setting_keeps_the_pools_other_defaults():
    """`preprocessor: {num_replicas: 4}` once replaced the whole pool and dropped max_ongoing_requests to Ray's 5."""
    args = AppArgs.model_validate({
        "preprocessor": {"num_replicas": 4},
        "ingress": {"num_cpus": 2},
        "encoder": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}},
    })
    assert args.preprocessor.num_replicas == 4
    assert args.preprocessor.max_ongoing_requests == POOL_DEFAULTS["preprocessor"]["max_ongoing_requests"]
    assert args.preprocessor.num_cpus == POOL_DEFAULTS["preprocessor"]["num_cpus"]
    assert args.ingress.num_cpus == 2 and args.ingress.num_replicas == 1
    assert args.ingress.max_ongoing_requests == POOL_DEFAULTS["ingress"]["max_ongoing_requests"]
    encoder = args.model_specs()[0].encoder
    # an autoscaling config replaces the default replica count, and keeps the rest
    assert encoder.num_replicas is None and encoder.autoscaling_config["max_replicas"] == 3
    assert encoder.max_ongoing_requests == POOL_DEFAULTS["encoder"]["max_ongoing_requests"]
    spec = ModelSpec.model_validate({"encoder": {"num_cpus": 3}})
    assert spec.encoder.num_cpus == 3 and spec.encoder.max_ongoing_requests == POOL_DEFAULTS["encoder"]["max_ongoing_requests"]
    # an explicit null leaves the option to Ray
    assert AppArgs.model_validate({"ingress": {"max_ongoing_requests": None}}).ingress.max_ongoing_requests is None


def test_the_deployments_carry_no_options_of_their_own():
    """Pool defaults live once (POOL_DEFAULTS); the decorators add none that could disagree with them."""
    from serve_app.encoder import ClipEncoder
    from serve_app.ingress import OpenAIIngress
    from serve_app.preprocess import Preprocessor

    app = build_app(AppArgs())
    ingress = app._bound_deployment
    assert ingress.max_ongoing_requests == POOL_DEFAULTS["ingress"]["max_ongoing_requests"]
    assert ingress.ray_actor_options["num_cpus"] == POOL_DEFAULTS["ingress"]["num_cpus"]
    for deployment in (ClipEncoder, OpenAIIngress, Preprocessor):
        set_by_decorator = deployment._deployment_config.user_configured_option_names
        assert not {"max_ongoing_requests", "ray_actor_options", "num_replicas"} & set_by_decorator


def test_a_request_count_target_on_the_queue_depth_encoder_is_refused_naming_its_knobs():
    import pytest
    from pydantic import ValidationError

    from serve_app.config import AppArgs

    with pytest.raises(ValidationError, match="target_fill"):
        AppArgs.model_validate({"encoder": {"autoscaling_config": {"target_ongoing_requests": 2, "max_replicas": 4}}})
    # Ray's request-count policy named explicitly: then the target is what it reads
    args = AppArgs.model_validate({"encoder": {"autoscaling_config": {
        "target_ongoing_requests": 2, "max_replicas": 4,
        "policy": {"policy_function": "ray.serve.autoscaling_policy:default_autoscaling_policy"}}}})
    (spec,) = args.model_specs()
    assert spec.encoder.autoscaling_config["target_ongoing_requests"] == 2
