"""`serve_app.app:build_app`, the single import path: YAML/CLI args -> `AppArgs` -> a bound application.

    serve run serve_app.app:build_app model=local-dir:/tmp/m served_model_name=tiny
    serve run deploy/local-cpu.yaml
"""

from typing import Any

from ray.serve import Application

from serve_app.config import AppArgs, BatchSettings, ModelSpec
from serve_app.encoder import ClipEncoder
from serve_app.ingress import OpenAIIngress
from serve_app.preprocess import Preprocessor


def build_app(args: AppArgs) -> Application:
    """Binds one Preprocessor pool, one ClipEncoder pool per model, and the OpenAIIngress in front; or, in
    the one-process layout, an OpenAIIngress that holds the other two itself."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    specs = args.model_specs()
    if args.layout == "one-process":
        (spec,) = specs
        return OpenAIIngress.options(user_config=spec.batching.model_dump(), **spec.encoder_options).bind(
            None, None, [_constructor_spec(spec)], args.max_inputs_per_request, args.zero_shot, args.image_limits,
            **_hardening(args, spec.encoder.max_ongoing_requests),
        )
    encoders: dict[str, Any] = {}
    for spec in specs:
        encoders[spec.name] = ClipEncoder.options(
            name=f"ClipEncoder-{spec.slug}",
            user_config=spec.batching.model_dump(),
            **spec.encoder_options,
        ).bind(_constructor_spec(spec))
    preprocessor = Preprocessor.options(**args.preprocessor.deployment_options()).bind(
        specs, args.image_limits, args.limits, args.image_url_policy, args.preprocessor.num_cpus
    )
    return OpenAIIngress.options(**args.ingress.deployment_options()).bind(
        preprocessor, encoders, specs, args.max_inputs_per_request, args.zero_shot, None,
        **_hardening(args, args.ingress.max_ongoing_requests),
    )


# Ray's own default of max_ongoing_requests, for a pool that does not set it.
RAY_MAX_ONGOING_REQUESTS = 5


def _hardening(args: AppArgs, ingress_max_ongoing: int | None) -> dict[str, Any]:
    """The ingress's deadline, request limits, admission bound, API key sources and image URL policy (keys
    are resolved in the replica).

    Admission: an ingress replica answers 429 in OpenAI's shape once `limits.max_requests_in_flight` requests
    are in it, by default 3/4 of its `max_ongoing_requests`, so that Ray's own queue bound (which answers in
    plain text) stays a backstop that quick refusals keep from filling."""
    in_flight = args.limits.max_requests_in_flight
    if in_flight is None:
        in_flight = max(1, (ingress_max_ongoing or RAY_MAX_ONGOING_REQUESTS) * 3 // 4)
    return {
        "max_requests_in_flight": in_flight,
        "request_timeout_s": args.request_timeout_s,
        "limits": args.limits,
        "api_keys": args.api_keys,
        "api_keys_file": args.api_keys_file,
        "tenancy": args.tenancy,
        "ingress_replicas": _max_replicas(args),
        "image_url_policy": args.image_url_policy,
        "batch": args.batch,
        "batch_runner": _batch_runner(args, args.model_specs()),
    }


def _max_replicas(args: AppArgs) -> int:
    """The most ingress replicas there can be: with Redis away each counts 1/N of a key's limits."""
    if args.layout == "one-process":
        options = args.model_specs()[0].encoder_options
    else:
        options = args.ingress.deployment_options()
    auto = options.get("autoscaling_config") or {}
    replicas = options.get("num_replicas")
    return max(1, int(auto.get("max_replicas") or (replicas if isinstance(replicas, int) else 1)))


def _constructor_spec(spec: ModelSpec) -> ModelSpec:
    """Batching reaches the replica only through user_config, so changing it is a light update
    (`reconfigure`), not a restart: the constructor arguments stay the same."""
    return spec.model_copy(update={"batching": BatchSettings()})



def _batch_runner(args: AppArgs, specs: list[ModelSpec]) -> Any:
    """The BatchRunner deployment when the Batch API is on, else None. Nothing calls it (it takes its work
    from the database); it is handed to the ingress because an application deploys what its ingress is bound
    to."""
    if not args.batch.enabled:
        return None
    from serve_app.batch.runner import BatchRunner
    from serve_app.protocol import ListLimits

    list_limits = (args.max_inputs_per_request, args.zero_shot.max_labels, args.zero_shot.max_templates)
    assert len(list_limits) == len(ListLimits.__dataclass_fields__)
    return BatchRunner.options(**args.batch.runner.deployment_options()).bind(
        args.batch, [_constructor_spec(s) for s in specs], args.image_limits, args.limits, args.image_url_policy,
        args.max_inputs_per_request, args.tenancy, list_limits,
    )
