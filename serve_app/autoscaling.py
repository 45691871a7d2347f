"""Queue-depth autoscaling of an encoder pool, run by Ray Serve's own autoscaler.

One request may carry 1 or 2,048 items, so counting requests (Ray's default policy) says little about how much
work waits for an encoder. Each encoder replica reports, through `record_autoscaling_stats`, the work it holds
in units of *full batches*: rows waiting at its gate and in its `@serve.batch` queues plus the rows of the pass
that is running, each divided by its modality's current `max_batch_size`. The policy sums that over the running
replicas (each averaged by Ray over `look_back_period_s`), adds the requests queued at the callers' handles,
and asks for

    desired = pending batches / target_fill        (= pending items / (target_fill * max_batch_size))

replicas, with a hysteresis band: it scales up as soon as the load needs more replicas than run, and down only
to a count that the load would fill to at most `(1 - hysteresis) * target_fill`. Ray's wrapper around every
custom policy then applies `min_replicas`/`max_replicas`, `upscale_delay_s`/`downscale_delay_s` and the
scaling factors. When no replica has reported yet (start-up, an encoder of another version) the policy falls
back to Ray's request-count policy.

Ray instantiates the class once per deployment (with `policy_kwargs`) in the Serve controller and calls it
every control-loop tick.
"""

import math
from typing import Any

# What ClipEncoder.record_autoscaling_stats reports; each a per-replica value Ray averages over the look-back.
PENDING_BATCHES = "pending_batches"  # full batches' worth of rows waiting or in the running pass
BATCHES_PER_CALL = "batches_per_call"  # recent mean of a call's rows / max_batch_size (for handle-queued calls)


class QueueDepthPolicy:
    """desired replicas = pending batches / target_fill, with hysteresis; see the module docstring."""

    def __init__(self, target_fill: float = 1.0, hysteresis: float = 0.25) -> None:
        if target_fill <= 0:
            raise ValueError(f"target_fill must be > 0, got {target_fill}")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis}")
        self.target_fill = target_fill
        self.hysteresis = hysteresis
        self._gauges: Any = None

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        metrics = ctx.aggregated_metrics or {}
        pending = metrics.get(PENDING_BATCHES) or {}
        reported = [pending[r] for r in ctx.running_replicas if r in pending]
        if not reported:
            from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

            desired, ray_state = replica_queue_length_autoscaling_policy(ctx)
            state.update(ray_state or {})
            state["basis"] = "requests"
            self._export(ctx, desired, None)
            return desired, state
        per_call = metrics.get(BATCHES_PER_CALL) or {}
        per_call_values = [per_call[r] for r in ctx.running_replicas if r in per_call]
        batches_per_call = max(per_call_values) if per_call_values else 1.0
        queued_calls = ctx.total_queued_requests or 0.0
        pending_batches = sum(reported) + queued_calls * batches_per_call
        desired = self.desired_replicas(pending_batches, ctx.current_num_replicas)
        state.update({"basis": "pending_batches", "pending_batches": pending_batches})
        self._export(ctx, desired, pending_batches)
        return desired, state

    def desired_replicas(self, pending_batches: float, current: int) -> int:
        """The replica count for `pending_batches` of work, given `current` running replicas."""
        needed = pending_batches / self.target_fill
        if needed > current:
            return math.ceil(needed)
        # Down only as far as a count the load fills to at most (1 - hysteresis) of the target.
        return min(current, math.ceil(needed / (1 - self.hysteresis)))

    def _export(self, ctx: Any, desired: float, pending_batches: float | None) -> None:
        """The value the policy acts on, as gauges of the controller (Ray's metrics agent exports them)."""
        try:
            from serve_app import metrics

            metrics.set_autoscaling_decision(ctx.app_name or "", ctx.deployment_name, desired, pending_batches)
        except Exception:  # metrics never break the scaling decision (unit tests run without Ray)
            pass
