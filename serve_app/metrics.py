"""Every metric of the service, in one file, with its buckets (after TEI's `prometheus.rs`).

Ray Serve exports these from each replica through Ray's metrics agent (Prometheus names gain a `ray_`
prefix), next to Serve's own request, queue and `@serve.batch` metrics. Metric objects are created lazily
in the replica that records them.
"""

from functools import cache
from typing import Any

PREFIX = "clip_"
SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
FILL_BUCKETS = [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]


def _in_ray() -> bool:
    """Metrics are recorded inside Ray replicas only; library use (benchmarks, unit tests) skips them."""
    import ray

    return ray.is_initialized()


@cache
def _metrics() -> dict[str, Any]:
    from ray.serve import metrics as m

    return {
        "requests": m.Counter(
            PREFIX + "requests",
            description="HTTP requests by route and status code.",
            tag_keys=("route", "status"),
        ),
        "request_seconds": m.Histogram(
            PREFIX + "request_seconds",
            description="End-to-end request latency at the ingress.",
            boundaries=SECONDS_BUCKETS,
            tag_keys=("route",),
        ),
        "inputs": m.Counter(
            PREFIX + "inputs",
            description="Inputs embedded, by model and modality.",
            tag_keys=("model", "modality"),
        ),
        "label_cache": m.Counter(
            PREFIX + "label_cache_lookups",
            description="Zero-shot label-embedding cache lookups, by result (hit or miss).",
            tag_keys=("model", "result"),
        ),
        "preprocess_seconds": m.Histogram(
            PREFIX + "preprocess_seconds",
            description="Preprocessing time of one request's inputs of one modality.",
            boundaries=SECONDS_BUCKETS,
            tag_keys=("modality",),
        ),
        "queue_wait_seconds": m.Histogram(
            PREFIX + "queue_wait_seconds",
            description="Time an encoder call waited for its batch to start.",
            boundaries=SECONDS_BUCKETS,
            tag_keys=("model", "modality"),
        ),
        "encode_seconds": m.Histogram(
            PREFIX + "encode_seconds",
            description="Forward pass time of one batch.",
            boundaries=SECONDS_BUCKETS,
            tag_keys=("model", "modality"),
        ),
        "refill_wait_seconds": m.Histogram(
            PREFIX + "refill_wait_seconds",
            description="How long an encoder waited after a pass for the callers it answered, by how it ended "
            "(all_back, full, pause, deadline).",
            boundaries=SECONDS_BUCKETS,
            tag_keys=("model", "outcome"),
        ),
        "batch_size": m.Histogram(
            PREFIX + "batch_size",
            description="Items per forward pass.",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model", "modality"),
        ),
        "batch_fill": m.Histogram(
            PREFIX + "batch_fill",
            description="Items per forward pass divided by its max_batch_size.",
            boundaries=FILL_BUCKETS,
            tag_keys=("model", "modality"),
        ),
        "pending_items": m.Gauge(
            PREFIX + "encoder_pending_items",
            description="Items an encoder replica holds that no forward pass has started: its queue depth.",
            tag_keys=("model",),
        ),
        "running_items": m.Gauge(
            PREFIX + "encoder_running_items",
            description="Items in an encoder replica's running forward pass.",
            tag_keys=("model",),
        ),
        "loop_lag_seconds": m.Histogram(
            PREFIX + "event_loop_lag_seconds",
            description="How late a replica's event loop ran a timer (a blocked or starved loop); Serve adds the "
            "deployment and replica tags.",
            boundaries=SECONDS_BUCKETS,
        ),
        "rejected": m.Counter(
            PREFIX + "rejected_requests",
            description="Requests refused before or instead of their work, by route and reason "
            "(backpressure, overloaded, unavailable, timeout, unauthorized, too_large, slow_body).",
            tag_keys=("route", "reason"),
        ),
        # Per key (serve_app/tenancy): one series per key id up to `tenancy.max_metric_key_ids`, then `other`.
        "key_requests": m.Counter(
            PREFIX + "key_requests", description="Requests answered per API key id, by status code.",
            tag_keys=("key_id", "status"),
        ),
        "key_tokens": m.Counter(PREFIX + "key_tokens", description="Text tokens used per API key id.",
                                tag_keys=("key_id",)),
        "key_images": m.Counter(PREFIX + "key_images", description="Images embedded per API key id.",
                                tag_keys=("key_id",)),
        "key_refusals": m.Counter(
            PREFIX + "key_refusals", description="Requests of a key refused by its limits or credit, by reason "
            "(rate_limited_requests, rate_limited_tokens, rate_limited_images, insufficient_quota, forbidden).",
            tag_keys=("key_id", "reason"),
        ),
        "rate_limit_degraded": m.Gauge(
            PREFIX + "rate_limit_store_degraded",
            description="1 while this ingress replica counts rate limits locally because Redis is unreachable.",
        ),
        "usage_spooled": m.Gauge(
            PREFIX + "usage_records_spooled",
            description="Usage records waiting in this ingress replica for the database (grows in an outage).",
        ),
        "usage_dropped": m.Gauge(
            PREFIX + "usage_records_dropped",
            description="Usage records this ingress replica dropped because its spool was full (since start).",
        ),
    }


def count_key_request(key_id: str, status: int, tokens: int, images: int) -> None:
    if not _in_ray():
        return
    _metrics()["key_requests"].inc(tags={"key_id": key_id, "status": str(status)})
    if tokens:
        _metrics()["key_tokens"].inc(tokens, tags={"key_id": key_id})
    if images:
        _metrics()["key_images"].inc(images, tags={"key_id": key_id})


def count_key_refusal(key_id: str, reason: str) -> None:
    if _in_ray():
        _metrics()["key_refusals"].inc(tags={"key_id": key_id, "reason": reason})


def set_tenancy_state(degraded: bool, spooled: int, dropped: int) -> None:
    if not _in_ray():
        return
    _metrics()["rate_limit_degraded"].set(1 if degraded else 0)
    _metrics()["usage_spooled"].set(spooled)
    _metrics()["usage_dropped"].set(dropped)


@cache
def _controller_metrics() -> dict[str, Any]:
    """Gauges the autoscaling policy sets in the Serve controller (no replica context there)."""
    from ray.util import metrics as m

    return {
        "desired_replicas": m.Gauge(
            PREFIX + "autoscaling_desired_replicas",
            description="Replicas the autoscaling policy asks for, before Ray's bounds and delays.",
            tag_keys=("application", "deployment"),
        ),
        "pending_batches": m.Gauge(
            PREFIX + "autoscaling_pending_batches",
            description="Full batches' worth of items waiting for or running in an encoder pool: what the "
            "queue-depth policy acts on.",
            tag_keys=("application", "deployment"),
        ),
    }


def observe_request(route: str, status: int, seconds: float) -> None:
    if not _in_ray():
        return
    _metrics()["requests"].inc(tags={"route": route, "status": str(status)})
    _metrics()["request_seconds"].observe(seconds, tags={"route": route})


def count_inputs(model: str, modality: str, count: int) -> None:
    if not _in_ray():
        return
    if count:
        _metrics()["inputs"].inc(count, tags={"model": model, "modality": modality})


def observe_preprocess(modality: str, seconds: float) -> None:
    if not _in_ray():
        return
    _metrics()["preprocess_seconds"].observe(seconds, tags={"modality": modality})


def observe_queue_wait(model: str, modality: str, seconds: float) -> None:
    if not _in_ray():
        return
    _metrics()["queue_wait_seconds"].observe(seconds, tags={"model": model, "modality": modality})


def observe_batch(model: str, modality: str, size: int, seconds: float, fill: float) -> None:
    if not _in_ray():
        return
    tags = {"model": model, "modality": modality}
    _metrics()["encode_seconds"].observe(seconds, tags=tags)
    _metrics()["batch_size"].observe(size, tags=tags)
    _metrics()["batch_fill"].observe(fill, tags=tags)


def set_encoder_depth(model: str, pending_items: int, running_items: int) -> None:
    if not _in_ray():
        return
    _metrics()["pending_items"].set(pending_items, tags={"model": model})
    _metrics()["running_items"].set(running_items, tags={"model": model})


def count_rejected(route: str, reason: str) -> None:
    if not _in_ray():
        return
    _metrics()["rejected"].inc(tags={"route": route, "reason": reason})


def set_autoscaling_decision(application: str, deployment: str, desired: float,
                             pending_batches: float | None) -> None:
    if not _in_ray():
        return
    tags = {"application": application, "deployment": deployment}
    _controller_metrics()["desired_replicas"].set(desired, tags=tags)
    if pending_batches is not None:
        _controller_metrics()["pending_batches"].set(pending_batches, tags=tags)


def observe_refill(model: str, outcome: str, seconds: float) -> None:
    if not _in_ray():
        return
    _metrics()["refill_wait_seconds"].observe(seconds, tags={"model": model, "outcome": outcome})


def count_label_cache(model: str, hits: int, misses: int) -> None:
    if not _in_ray():
        return
    for result, count in (("hit", hits), ("miss", misses)):
        if count:
            _metrics()["label_cache"].inc(count, tags={"model": model, "result": result})


def observe_loop_lag(seconds: float) -> None:
    if _in_ray():
        _metrics()["loop_lag_seconds"].observe(seconds)
