"""The environment Ray's own processes need to serve this app (`deploy/ray-serve.env`).

Ray reads these variables when its processes start, so they belong to whoever starts Ray (`make serve*`,
the KubeRay pod spec, the tests, `clip-bench`), not to a Serve config. This module is for the Python
launchers in this repository; the Makefile reads the same file.
"""

import os
import random
import socket
from collections.abc import MutableMapping
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


# Below Linux's ephemeral range (32768-60999 by default) and above Ray's worker ports (10002-19999): a port
# picked here stays free until the server binds it, seconds later, while the Ray instance that is starting
# meanwhile takes ephemeral ports of its own (HAProxy once lost its stats port that way).
_PICK_FROM = range(20000, 32768)


def free_port() -> int:
    """A TCP port nobody listens on right now, outside the OS's ephemeral range."""
    for port in random.sample(_PICK_FROM, 200):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {_PICK_FROM.start}-{_PICK_FROM.stop - 1}")


def haproxy_ports() -> dict[str, str]:
    """Free ports for HAProxy's node-wide listeners, for a Ray instance that may not be alone on the machine."""
    ports: set[int] = set()
    while len(ports) < len(HAPROXY_NODE_PORTS):
        ports.add(free_port())
    return {name: str(port) for name, port in zip(HAPROXY_NODE_PORTS, sorted(ports))}


def one_machine_env() -> dict[str, str]:
    """What a Ray instance alone on one machine runs with: deploy/ray-serve.env plus ONE_MACHINE_ENV."""
    return {**serve_env(), **ONE_MACHINE_ENV}


def use_one_machine_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """`one_machine_env()` and free HAProxy ports, for a Ray started in this process; what `environ`
    already sets wins. Call it before Ray is imported: Ray reads these at import."""
    for key, value in {**one_machine_env(), **haproxy_ports()}.items():
        environ.setdefault(key, value)
