"""`serve run` of a deploy/ config, as `make serve-dev` starts it, and the clean-up of what it started."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from serve_app.processes import listeners, session_members, signal_session
from serve_app.ray_env import NODE_PORTS, free_port, node_ports, one_machine_env, serve_env, small_cpu_env
from tests.conftest import data_uri, encode, random_image

ROOT = Path(__file__).resolve().parents[2]


def listener_names(port: int) -> set[str]:
    """Names of the processes listening on a local TCP port."""
    return {holder.split(" (pid")[0] for holder in listeners(port)}


def child_of(pid: int, timeout_s: float = 30.0) -> int:
    """The pid of `pid`'s child process (the launcher's `serve run`, leader of a session of its own)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    return int(entry.name)
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.2)
    raise AssertionError(f"process {pid} started no child")


def replica_env(sid: int, deployment: str, key: str, timeout_s: float = 30.0) -> str | None:
    """`key` in the environment of the session's replica process of `deployment` (Linux /proc).

    Polls: on a loaded machine Ray may be replacing the replica (a missed health check) when first asked.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        titles = []
        for pid in session_members(sid):
            proc = Path(f"/proc/{pid}")
            try:
                title = (proc / "cmdline").read_bytes()
                titles.append(title.replace(b"\0", b" ").decode(errors="replace")[:80])
                if f"ServeReplica:clip:{deployment}".encode() in title:
                    for entry in (proc / "environ").read_bytes().split(b"\0"):
                        name, _, value = entry.decode(errors="replace").partition("=")
                        if name == key:
                            return value
                    return None
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise AssertionError(f"no {deployment} replica in session {sid}; its processes: {titles}")
        time.sleep(1)


def test_signal_session_reaches_only_that_session_and_name():
    """The clean-up behind the `serve run` test and the session's Ray: SIGKILL by session id, by name."""

    def session_of(*commands: str) -> subprocess.Popen:
        shell = subprocess.Popen(["sh", "-c", " & ".join(commands) + " & wait"], start_new_session=True)
        deadline = time.monotonic() + 10
        while len(session_members(shell.pid)) < len(commands) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return shell

    bystander = subprocess.Popen(["sleep", "60"])  # in this test's own session: never touched
    named, whole = session_of("sleep 60", "sleep 60"), session_of("sleep 60")
    try:
        assert len(signal_session(named.pid, signal.SIGKILL, name="sleep")) == 2
        assert named.wait(timeout=10) == 0  # the shell's `wait` returned: both sleeps gone, the shell spared
        assert session_members(named.pid) == []
        assert len(signal_session(whole.pid, signal.SIGKILL)) == 2  # the shell and its sleep
        assert whole.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for process in (named, whole, bystander):
            process.kill()
            process.wait()


def dev_config(tmp_path: Path, tiny_model_dir: Path, port: int) -> Path:
    config = yaml.safe_load((ROOT / "deploy" / "dev.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["model"] = f"local-dir:{tiny_model_dir}"
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(tmp_path: Path, config: Path, env: dict[str, str], log_name: str) -> subprocess.Popen:
    """`python -m serve_app.ray_env --small-cpu -- serve run CONFIG`, as `make serve-dev` runs it."""
    serve = Path(sys.executable).parent / "serve"
    launcher = [sys.executable, "-m", "serve_app.ray_env", "--small-cpu", "--"]
    with open(tmp_path / log_name, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen([*launcher, str(serve), "run", "--address", "local", str(config)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve run exited early"
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:  # proxy up before the app
            pass
        time.sleep(1)
    pytest.fail("serve run did not become healthy in 180 s")


def stop_and_check(process: subprocess.Popen, sig: int, serve_session: int, ports: list[int]) -> None:
    """Stops the launcher with `sig` as Ctrl-C or a process manager would; then nothing it started is left:
    no process in `serve run`'s session, nothing listening on the service's ports."""
    process.send_signal(sig)
    process.wait(timeout=120)
    assert session_members(serve_session) == [], "processes outlived the stop"
    for port in ports:
        assert listeners(port) == set(), f"port {port} still held after the stop"


def test_serve_run_with_the_dev_config(tmp_path: Path, tiny_model_dir: Path):
    """`serve run deploy/dev.yaml`, as `make serve-dev` does, in a Ray instance of its own; stopped by Ctrl-C
    and then by SIGTERM, it leaves no process and no bound port behind, and a start that finds its port taken
    says so and who holds it."""
    port = free_port()
    config = dev_config(tmp_path, tiny_model_dir, port)
    # Ray's environment from the launcher alone (not the tests' own), and node-wide ports of its own
    # (NODE_PORTS): the session's Ray instance holds the ones the tests' environment names
    env = {k: v for k, v in os.environ.items() if k not in one_machine_env()}
    own_ports = node_ports()
    env.update({"RAY_USAGE_STATS_ENABLED": "0", **own_ports})
    ports = [port, *(int(own_ports[name]) for name in NODE_PORTS)]
    url = f"http://127.0.0.1:{port}"
    process = launch(tmp_path, config, env, "serve.log")
    sessions = [process.pid]  # the launcher's and each `serve run`'s: whatever is left there goes at the end
    try:
        serve_session = child_of(process.pid)
        sessions.append(serve_session)
        wait_healthy(url, process)
        response = requests.post(url + "/v1/embeddings", json={"input": "hello", "model": "tiny-clip"}, timeout=30)
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 32
        # a big photo (a 7 MB PNG: 9.6 MB of base64) crosses the pools: Ray's gRPC default of 4 MiB per message
        # between deployments is raised by deploy/ray-serve.env
        photo = data_uri(encode(random_image(1800, 1300, seed=5)))
        assert len(photo) > 8 * 1024 * 1024
        response = requests.post(url + "/v1/embeddings", json={"input": [{"image": photo}], "model": "tiny-clip"},
                                 timeout=120)
        assert response.status_code == 200, response.text[:500]
        # deploy/ray-serve.env is in effect: HAProxy, not Serve's Python proxy, holds the HTTP port; and so is
        # deploy/ray-small-cpu.env: the replicas that run torch see its OpenMP settings
        assert serve_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and listener_names(port) == {"haproxy"}
        assert replica_env(serve_session, "ClipEncoder", "GOMP_SPINCOUNT") == small_cpu_env()["GOMP_SPINCOUNT"]
        stop_and_check(process, signal.SIGINT, serve_session, ports)
        process = launch(tmp_path, config, env, "serve-2.log")
        sessions.append(process.pid)
        serve_session = child_of(process.pid)
        sessions.append(serve_session)
        wait_healthy(url, process)
        stop_and_check(process, signal.SIGTERM, serve_session, ports)
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the stopped server's TIME_WAIT
            taken.bind(("127.0.0.1", port))
            taken.listen()
            refused = launch(tmp_path, config, env, "serve-3.log")
            sessions.append(refused.pid)
            assert refused.wait(timeout=60) != 0
            log = (tmp_path / "serve-3.log").read_text()
            assert f"port {port}, the HTTP port (http_options.port), is already in use by python" in log, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for session in sessions:
            signal_session(session, signal.SIGKILL)
        process.wait()
