"""The one reader of deploy/*.env: the serving env on every node, the small-CPU tuning on CPU boxes only."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.ray_env import ONE_MACHINE_ENV, one_machine_env, serve_env, small_cpu_env

ROOT = Path(__file__).resolve().parents[2]


def test_ray_serve_env_file_parses_and_names_the_serving_mode(tmp_path: Path):
    env = serve_env()
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    bad = tmp_path / "bad.env"
    bad.write_text("# comment\nRAY_SERVE_THROUGHPUT_OPTIMIZED\n")
    with pytest.raises(ValueError, match="bad.env:2: expected KEY=VALUE"):
        serve_env(bad)


def test_small_cpu_tuning_is_a_file_of_its_own_that_only_cpu_boxes_add():
    serving, small = serve_env(), small_cpu_env()
    assert {"GOMP_SPINCOUNT", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"} <= set(small)
    assert not set(serving) & set(small)
    assert one_machine_env(small_cpu=True).items() >= {**serving, **small, **ONE_MACHINE_ENV}.items()
    gpu_box = one_machine_env(small_cpu=False)
    assert gpu_box.items() >= serving.items() and not set(gpu_box) & set(small)


def launched_env(*flags: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment `python -m serve_app.ray_env FLAGS -- env` runs its command with."""
    clean = {k: v for k, v in os.environ.items() if k not in one_machine_env()} if environ is None else environ
    out = subprocess.run([sys.executable, "-m", "serve_app.ray_env", *flags, "--", "env"], env=clean, cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_launcher_runs_a_command_with_the_env_and_the_callers_settings_win():
    cpu = launched_env("--small-cpu")
    assert cpu["GOMP_SPINCOUNT"] == small_cpu_env()["GOMP_SPINCOUNT"]
    assert cpu["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and cpu["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"
    assert "GOMP_SPINCOUNT" not in launched_env()
    own = {**os.environ, "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    assert launched_env("--small-cpu", environ=own)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_make_starts_cpu_configs_with_the_small_cpu_tuning_and_the_gpu_config_without():
    """What each `make serve*` target runs (make -n prints its commands without running them)."""
    def serve_line(target: str) -> str:
        out = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=ROOT, capture_output=True,
                             text=True, check=True, timeout=60).stdout
        (line,) = [line for line in out.splitlines() if " run deploy/" in line]
        assert "-m serve_app.ray_env" in line, line
        return line

    assert "--small-cpu" in serve_line("serve") and "local-cpu.yaml" in serve_line("serve")
    assert "--small-cpu" in serve_line("serve-dev") and "dev.yaml" in serve_line("serve-dev")
    assert "--small-cpu" not in serve_line("serve-gpu") and "local-gpu.yaml" in serve_line("serve-gpu")


def test_a_second_ray_instance_gets_node_ports_of_its_own(tmp_path):
    """Every node-wide listener gets a free port of its own, the fallback proxy's included (two instances that
    shared it answered each other's requests), and the launcher checks them before `serve run` starts."""
    from serve_app.ray_env import NODE_PORTS, node_ports, ports_needed

    ports = node_ports()
    assert set(NODE_PORTS) <= set(ports) and len({ports[name] for name in NODE_PORTS}) == len(NODE_PORTS)
    assert "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT" in NODE_PORTS
    config = tmp_path / "serve.yaml"
    config.write_text("http_options: {port: 8123}\napplications: []\n")
    needed = ports_needed(["serve", "run", str(config)], {"RAY_SERVE_ENABLE_HA_PROXY": "1", **ports})
    assert set(needed) == {8123, *(int(ports[name]) for name in NODE_PORTS
                                   if name != "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")}  # gRPC: not served here
