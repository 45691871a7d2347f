"""`build_app` builds every Serve config in deploy/; GPU configs ask for GPUs and CPU ones do not."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.app import build_app
from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "deploy").glob("*.yaml"))


def test_there_are_configs_for_cpu_gpu_and_dev():
    assert {"dev.yaml", "local-cpu.yaml", "local-gpu.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_serve_config_through_build_app(path: Path):
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    for application in schema.applications:
        assert application.import_path == "serve_app.app:build_app"
        args = AppArgs.model_validate(application.args)
        app = build_app(args)
        assert type(app).__name__ == "Application"


def test_gpu_config_asks_for_a_gpu_per_encoder_and_cpu_ones_do_not():
    def encoder_gpus(name: str) -> float:
        args = AppArgs.model_validate(yaml.safe_load((ROOT / "deploy" / name).read_text())["applications"][0]["args"])
        return args.model_specs()[0].encoder_gpus

    assert 0 < encoder_gpus("local-gpu.yaml") <= 1  # a GPU, or a share of one
    assert encoder_gpus("local-cpu.yaml") == 0 and encoder_gpus("dev.yaml") == 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_set_a_deadline_with_serves_timeout_as_the_backstop(path: Path):
    config = yaml.safe_load(path.read_text())
    args = AppArgs.model_validate(config["applications"][0]["args"])
    assert args.request_timeout_s and config["http_options"]["request_timeout_s"] > args.request_timeout_s


@pytest.mark.parametrize("name", ["local-gpu.yaml", "multi-model.yaml"])
def test_gpu_configs_autoscale_every_pool_and_the_encoders_on_queue_depth(name: str):
    args = AppArgs.model_validate(yaml.safe_load((ROOT / "deploy" / name).read_text())["applications"][0]["args"])
    for pool in (args.preprocessor, args.ingress, *(spec.encoder for spec in args.model_specs())):
        autoscaling = pool.autoscaling_config
        assert autoscaling and autoscaling["min_replicas"] < autoscaling["max_replicas"]
    for spec in args.model_specs():
        assert spec.encoder.autoscaling_config["policy"]["policy_function"] == "serve_app.autoscaling:QueueDepthPolicy"


@pytest.mark.parametrize("name", ["local-gpu.yaml", "multi-model.yaml"])
def test_gpu_configs_scale_the_preprocessing_pool_on_its_own_load_with_a_thread_per_cpu(name: str):
    args = AppArgs.model_validate(yaml.safe_load((ROOT / "deploy" / name).read_text())["applications"][0]["args"])
    ingress = build_app(args)._bound_deployment
    preprocessor = ingress.init_args[0]._bound_deployment
    assert preprocessor.name == "Preprocessor"
    cpus = preprocessor.ray_actor_options["num_cpus"]
    assert preprocessor.init_args[4] == cpus >= 2  # Preprocessor(models, limits, limits, policy, num_cpus): decode threads
    autoscaling = preprocessor._deployment_config.autoscaling_config
    assert autoscaling is not None and autoscaling.max_replicas > autoscaling.min_replicas
    assert cpus <= autoscaling.target_ongoing_requests <= 4 * cpus  # a few requests per decode thread
    assert autoscaling.policy.policy_function.endswith("default_autoscaling_policy")  # request count, not the GPU's
