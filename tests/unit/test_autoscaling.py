"""The queue-depth policy's arithmetic against synthetic autoscaling contexts (no Ray cluster), and how a
pool's autoscaling settings merge over the defaults."""

from types import SimpleNamespace

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from serve_app.autoscaling import BATCHES_PER_CALL, PENDING_BATCHES, QueueDepthPolicy
from serve_app.config import AUTOSCALING_DEFAULTS, AppArgs


def context(current: int, pending: list[float] | None, queued: float = 0.0, per_call: float = 1.0,
            requests: float = 0.0, target_ongoing: float = 2.0) -> SimpleNamespace:
    """What Ray's controller hands a policy: running replicas, their averaged custom metrics, handle queues."""
    replicas = [f"r{i}" for i in range(current)]
    metrics = None
    if pending is not None:
        metrics = {PENDING_BATCHES: dict(zip(replicas, pending)),
                   BATCHES_PER_CALL: {r: per_call for r in replicas[: len(pending)]}}
    return SimpleNamespace(
        app_name="clip", deployment_name="ClipEncoder-m", current_num_replicas=current, target_num_replicas=current,
        running_replicas=replicas, aggregated_metrics=metrics, total_queued_requests=queued,
        total_num_requests=requests, policy_state={},
        config=AutoscalingConfig(min_replicas=0, max_replicas=10, target_ongoing_requests=target_ongoing),
    )


def test_desired_replicas_are_pending_batches_over_the_target_fill():
    policy = QueueDepthPolicy(target_fill=1.0, hysteresis=0.25)
    assert policy(context(1, [3.0]))[0] == 3  # three full batches wait: three replicas
    assert policy(context(2, [2.5, 2.5]))[0] == 5
    assert QueueDepthPolicy(target_fill=0.5)(context(1, [1.0]))[0] == 2  # half-full batches as the target
    desired, state = policy(context(1, [1.0], queued=4, per_call=0.5))  # + 4 calls queued at handles, half a batch each
    assert desired == 3 and state["pending_batches"] == pytest.approx(3.0) and state["basis"] == "pending_batches"


def test_a_few_big_requests_count_like_many_small_ones():
    """Rows, not requests: 2 calls of 64 items weigh what 128 calls of 1 item do (batch size 32)."""
    policy = QueueDepthPolicy()
    few_big = policy(context(1, [2 * 64 / 32]))[0]
    many_small = policy(context(1, [128 / 32]))[0]
    assert few_big == many_small == 4


def test_hysteresis_holds_the_count_until_the_load_drops_well_below_it():
    policy = QueueDepthPolicy(target_fill=1.0, hysteresis=0.25)
    assert policy(context(4, [0.8] * 4))[0] == 4  # 3.2 batches need 4 at most: stay (no flapping at 3.x)
    assert policy(context(4, [0.6] * 4))[0] == 4  # 2.4 / 0.75 = 3.2 -> 4: still within the band
    assert policy(context(4, [0.5] * 4))[0] == 3  # 2.0 / 0.75 = 2.67 -> 3
    assert policy(context(4, [0.0] * 4))[0] == 0  # idle: Ray's bounds keep min_replicas
    assert policy.desired_replicas(5.0, 4) == 5  # up as soon as the load needs more


def test_missing_custom_metrics_fall_back_to_rays_request_count_policy():
    desired, state = QueueDepthPolicy()(context(2, None, requests=12, target_ongoing=2))
    assert desired == pytest.approx(6) and state["basis"] == "requests"
    # replicas that have not reported yet do not count as idle ones
    desired, state = QueueDepthPolicy()(context(2, [], requests=2, target_ongoing=2))
    assert state["basis"] == "requests"


def test_bad_kwargs_are_refused():
    for kwargs in ({"target_fill": 0}, {"hysteresis": 1.0}):
        with pytest.raises(ValueError):
            QueueDepthPolicy(**kwargs)


def test_ray_loads_the_policy_class_from_the_default_config():
    """The encoder's default autoscaling config names a class Ray can import and build with its kwargs."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    options = AppArgs.model_validate({"encoder": {"autoscaling_config": {"max_replicas": 3}}}).model_specs()[0].encoder_options
    config = AutoscalingConfig(**options["autoscaling_config"])
    policy = _resolve_policy_callable(config.policy)
    assert isinstance(policy, QueueDepthPolicy) and policy.target_fill == 1.0
    assert config.max_replicas == 3 and config.upscale_delay_s == AUTOSCALING_DEFAULTS["encoder"]["upscale_delay_s"]


def test_users_tune_or_replace_the_policy_and_other_pools_keep_rays():
    def encoder_autoscaling(autoscaling: dict) -> dict:
        args = AppArgs.model_validate({"encoder": {"autoscaling_config": autoscaling}})
        return args.model_specs()[0].encoder_options["autoscaling_config"]

    tuned = encoder_autoscaling({"max_replicas": 4, "policy": {"policy_kwargs": {"target_fill": 0.5}}})
    assert tuned["policy"]["policy_function"] == "serve_app.autoscaling:QueueDepthPolicy"
    assert tuned["policy"]["policy_kwargs"] == {"target_fill": 0.5, "hysteresis": 0.25}
    plain_ray = {"policy_function": "ray.serve.autoscaling_policy:default_autoscaling_policy"}
    replaced = encoder_autoscaling({"max_replicas": 4, "target_ongoing_requests": 8, "policy": plain_ray})
    assert replaced["policy"] == plain_ray and AutoscalingConfig(**replaced).policy.is_default_policy_function()
    preprocessor = AppArgs.model_validate({"preprocessor": {"autoscaling_config": {"max_replicas": 8}}}).preprocessor
    assert "policy" not in preprocessor.autoscaling_config and preprocessor.num_replicas is None
    assert preprocessor.autoscaling_config["target_ongoing_requests"] == AUTOSCALING_DEFAULTS["preprocessor"]["target_ongoing_requests"]
    assert AutoscalingPolicy(**tuned["policy"]).policy_kwargs["target_fill"] == 0.5
    zero = encoder_autoscaling({"min_replicas": 0, "max_replicas": 2})
    assert AutoscalingConfig(**zero).min_replicas == 0


def test_every_pool_has_a_bounded_queue_answered_with_429_and_retry_after():
    args = AppArgs()
    pools = [args.preprocessor, args.ingress, args.model_specs()[0].encoder]
    for pool in pools:
        assert pool.max_queued_requests and pool.max_queued_requests > 0
        assert pool.backpressure_config == {"status_code": 429, "retry_after_s": 1}
    custom = AppArgs.model_validate({"ingress": {"backpressure_config": {"status_code": 503}}}).ingress
    assert custom.backpressure_config == {"status_code": 503, "retry_after_s": 1}
