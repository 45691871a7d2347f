"""The environment Ray's own processes need to serve this app: the one reader of `deploy/*.env`.

Ray reads these variables when its processes start, so they belong to whoever starts Ray, not to a Serve
config. Two files:
- `deploy/ray-serve.env`: every serving node (throughput mode, HAProxy), GPU boxes and KubeRay pods included;
- `deploy/ray-small-cpu.env`: added on small CPU-only machines (`make serve`, `make serve-dev`, the tests,
  the CPU benchmarks), never on GPU nodes.

The Makefile starts `serve` through this module's launcher (`python -m serve_app.ray_env [--small-cpu] -- CMD`),
which also stops everything the command started; the tests and `clip-bench` call `use_one_machine_env` before
they import Ray.
"""

import argparse
import os
import random
import shutil
import socket
import sys
from collections.abc import MutableMapping
from pathlib import Path

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
SERVING_ENV_FILE = DEPLOY_DIR / "ray-serve.env"
SMALL_CPU_ENV_FILE = DEPLOY_DIR / "ray-small-cpu.env"

# For a Ray instance alone on one machine (`serve run` on a box, tests, benchmarks): no load balancer needs
# the 30 s drain of a stopping ingress replica, so stopping takes seconds. KubeRay pods keep Ray's default.
ONE_MACHINE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}

# A Ray instance binds these once per node (HAProxy's metrics and stats) or on its head node (the fallback
# proxy that HAProxy sends requests to while no ingress replica is up); a second Ray instance on the same
# machine (tests, benchmarks) needs other ones. Sharing the fallback proxy's port sent one instance's requests
# to the other's apps.
NODE_PORTS = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
              "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file; comments and blank lines skipped."""
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


def serve_env(path: Path = SERVING_ENV_FILE) -> dict[str, str]:
    """What every serving node runs with (deploy/ray-serve.env)."""
    return read_env_file(path)


def small_cpu_env() -> dict[str, str]:
    """The small-CPU tuning (deploy/ray-small-cpu.env), for CPU-only machines only."""
    return read_env_file(SMALL_CPU_ENV_FILE)


def haproxy_env() -> dict[str, str]:
    """HAProxy started through `clip-haproxy` (serve_app/haproxy.py: splice off, so that every client that
    goes away is seen), found beside this Python or on PATH. Empty where the project is not installed (Ray
    then starts its bundled HAProxy as is). The serving image sets the same variable itself (Dockerfile)."""
    beside = Path(sys.executable).parent / "clip-haproxy"
    wrapper = str(beside) if os.access(beside, os.X_OK) else shutil.which("clip-haproxy")
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": wrapper} if wrapper else {}


def one_machine_env(small_cpu: bool = True) -> dict[str, str]:
    """What a Ray instance alone on one machine runs with: the serving env, the small-CPU tuning unless
    `small_cpu=False` (a GPU box), HAProxy through `clip-haproxy`, and ONE_MACHINE_ENV."""
    return {**serve_env(), **(small_cpu_env() if small_cpu else {}), **haproxy_env(), **ONE_MACHINE_ENV}


# Below Linux's ephemeral range (32768-60999 by default) and above Ray's worker ports (10002-19999): a port
# picked here stays free until the server binds it, seconds later, while the Ray instance that is starting
# meanwhile takes ephemeral ports of its own (HAProxy once lost its stats port that way).
_PICK_FROM = range(20000, 32768)


def _bindable(port: int) -> bool:
    """Nobody holds `port` on any address: a server of ours may bind 0.0.0.0 or 127.0.0.1 (a socket on one
    of them alone does not stop a bind on the other)."""
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port() -> int:
    """A TCP port nobody listens on right now, outside the OS's ephemeral range."""
    for port in random.sample(_PICK_FROM, 200):
        if _bindable(port):
            return port
    raise RuntimeError(f"no free TCP port in {_PICK_FROM.start}-{_PICK_FROM.stop - 1}")


def node_ports() -> dict[str, str]:
    """Free ports for a Ray instance that may not be alone on the machine: the node-wide listeners (NODE_PORTS),
    and private ranges for the ingress replicas' own HTTP and gRPC servers (direct ingress). Serve's defaults for
    the latter (30000-31000, 40000-41000) are the same in every Ray instance, and a replica bound to 127.0.0.1
    there takes the connections another instance's HAProxy sends to its own replica on 0.0.0.0: requests
    answered by a stranger's app."""
    ports: set[int] = set()
    while len(ports) < len(NODE_PORTS):
        ports.add(free_port())
    return {**{name: str(port) for name, port in zip(NODE_PORTS, sorted(ports))}, **direct_ingress_ports()}


def direct_ingress_ports(block: int = 40) -> dict[str, str]:
    """Two blocks of `block` free ports, for the ingress replicas' HTTP and gRPC servers."""
    for _ in range(100):
        base = random.randrange(_PICK_FROM.start, _PICK_FROM.stop - 2 * block, block)
        if all(_bindable(p) for p in range(base, base + 2 * block)):
            return {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
                    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + block - 1),
                    "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + block),
                    "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + 2 * block - 1)}
    raise RuntimeError(f"no {2 * block} free consecutive TCP ports in {_PICK_FROM.start}-{_PICK_FROM.stop - 1}")


def use_one_machine_env(environ: MutableMapping[str, str] = os.environ, small_cpu: bool = True) -> None:
    """`one_machine_env()` and free node-wide ports (`node_ports`), for a Ray started in this process; what `environ`
    already sets wins. Call it before Ray is imported: Ray reads these at import."""
    for key, value in {**one_machine_env(small_cpu), **node_ports()}.items():
        environ.setdefault(key, value)


def ports_needed(command: list[str], env: dict[str, str]) -> dict[int, str]:
    """The TCP ports a `serve run CONFIG.yaml` command will bind on this machine, with what each is for:
    the config's HTTP port and, behind HAProxy, its stats and metrics ports and the fallback proxy's. Empty for
    other commands."""
    configs = [arg for arg in command if arg.endswith((".yaml", ".yml", ".json"))]
    if "run" not in command or not configs or not Path(configs[0]).is_file():
        return {}
    import yaml

    config = yaml.safe_load(Path(configs[0]).read_text(encoding="utf-8")) or {}
    ports = {int((config.get("http_options") or {}).get("port", 8000)): "the HTTP port (http_options.port)"}
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        ports[int(env.get("RAY_SERVE_HAPROXY_STATS_PORT", "8404"))] = "HAProxy's stats (RAY_SERVE_HAPROXY_STATS_PORT)"
        ports[int(env.get("RAY_SERVE_HAPROXY_METRICS_PORT", "9101"))] = (
            "HAProxy's metrics (RAY_SERVE_HAPROXY_METRICS_PORT)")
        ports[int(env.get("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "8500"))] = (
            "Serve's fallback proxy (RAY_SERVE_FALLBACK_PROXY_HTTP_PORT)")
    return ports


def main(argv: list[str] | None = None) -> None:
    """`python -m serve_app.ray_env [--small-cpu] -- serve run deploy/dev.yaml`: runs the command with the
    one-machine Ray environment (what the caller's environment already sets wins), in a session of its own:
    Ctrl-C or SIGTERM stops it, and then everything it started (HAProxy included). A port the service needs
    that is already taken is named, with its holder, before anything starts."""
    parser = argparse.ArgumentParser(prog="python -m serve_app.ray_env", description=main.__doc__)
    parser.add_argument("--small-cpu", action="store_true", help="add deploy/ray-small-cpu.env (CPU-only boxes)")
    parser.add_argument("--print", action="store_true", help="print KEY=VALUE lines instead of running a command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    env = one_machine_env(args.small_cpu)
    if args.print:
        print("\n".join(f"{key}={value}" for key, value in env.items()))
        return
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (use -- CMD ARGS, or --print)")
    from serve_app.processes import listeners, run_in_own_session

    full_env = {**env, **os.environ}
    for port, purpose in ports_needed(command, full_env).items():
        holders = listeners(port)
        if holders:
            sys.exit(f"port {port}, {purpose}, is already in use by {', '.join(sorted(holders))}: stop it, or "
                     f"choose another port")
    sys.exit(run_in_own_session(command, full_env))


if __name__ == "__main__":
    main()
