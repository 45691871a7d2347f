"""The environment Ray's own processes need to serve this app (`deploy/ray-serve.env`).

Ray reads these variables when its processes start, so they belong to whoever starts Ray (`make serve*`,
the KubeRay pod spec, the tests, `clip-bench`), not to a Serve config. This module is for the Python
launchers in this repository; the Makefile reads the same file.
"""

import socket
from pathlib import Path

ENV_FILE = Path(__file__).resolve().parents[1] / "deploy" / "ray-serve.env"

# For a Ray instance alone on one machine (make serve*, tests, benchmarks): no load balancer needs the 30 s
# drain of a stopping ingress replica, so stopping takes seconds. The Makefile sets the same.
ONE_MACHINE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}

# HAProxy binds these on every Ray node; a second Ray instance on the same machine (tests, benchmarks)
# needs other ones.
HAPROXY_NODE_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")


def serve_env(path: Path = ENV_FILE) -> dict[str, str]:
    """KEY=VALUE lines of the env file; comments and blank lines skipped."""
    env = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        env[key.strip()] = value.strip()
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def haproxy_ports() -> dict[str, str]:
    """Free ports for HAProxy's node-wide listeners, for a Ray instance that may not be alone on the machine."""
    return {name: str(_free_port()) for name in HAPROXY_NODE_PORTS}
