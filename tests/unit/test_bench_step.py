"""`clip-bench step`'s arithmetic over a synthetic run: scale-up and scale-down seconds, failures, refusals."""

from serve_app.bench.step import StepSettings, plot_step, scaling_summary, step_app_args, step_table
from serve_app.config import AppArgs


def step(concurrency: int, start: float, end: float, errors: dict | None = None) -> dict:
    return {"concurrency": concurrency, "start": start, "end": end, "window_s": end - start, "requests_per_s": 5.0,
            "latency_ms": {"p50": 10.0, "p99": 30.0}, "ok": 50, "errors": errors or {}}


def test_scaling_summary_times_the_steps_against_the_replica_timeline(tmp_path):
    timeline = [{"t": t, "running": {"ClipEncoder-m": n, "Preprocessor": 1, "OpenAIIngress": 1}}
                for t, n in [(0, 1), (10, 1), (13, 1), (14, 2), (40, 2), (55, 2), (61, 1), (70, 1)]]
    report = {"steps": [step(1, 0, 10), step(16, 10, 40, {"429": 3}), step(1, 40, 70, {"500": 1})],
              "timeline": timeline}
    report["scaling"] = summary = scaling_summary(report)
    assert summary == {"encoder": "ClipEncoder-m", "scale_up_s": 4, "scale_down_s": 21, "max_replicas": 2,
                       "failed_requests": 1, "refused_requests": 3}
    assert "a second replica running 4 s after the load step" in step_table(report)
    assert plot_step(report, tmp_path / "step.png").stat().st_size > 0


def test_the_step_service_autoscales_every_pool_with_the_queue_depth_policy():
    args = AppArgs.model_validate(step_app_args(StepSettings(max_replicas=3, app_args={"encoder": {"num_cpus": 0.25}})))
    encoder = args.model_specs()[0].encoder
    assert encoder.num_cpus == 0.25 and encoder.autoscaling_config["max_replicas"] == 3
    assert encoder.autoscaling_config["policy"]["policy_function"] == "serve_app.autoscaling:QueueDepthPolicy"
    assert args.preprocessor.autoscaling_config["max_replicas"] == 2


def test_the_replicas_before_the_step_are_the_last_ones_seen_before_it():
    """Start-up samples (no replica yet) before the load do not count as the pool's size at the step."""
    timeline = [{"t": t, "running": {"ClipEncoder-m": n}} for t, n in [(0, 0), (5, 1), (10, 1), (12, 2), (30, 1)]]
    report = {"steps": [step(16, 10, 20)], "timeline": timeline}
    summary = scaling_summary(report)
    assert summary["scale_up_s"] == 2 and summary["scale_down_s"] == 10
