"""`serve run` of a deploy/ config, as `make serve-dev` starts it, and the clean-up of what it started."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from serve_app.bench.servers import _session_members, signal_session
from serve_app.ray_env import free_port, haproxy_ports, one_machine_env, serve_env, small_cpu_env

ROOT = Path(__file__).resolve().parents[2]


def listener_names(port: int) -> set[str]:
    """Names of the processes listening on a local TCP port (Linux: /proc/net/tcp, then socket inodes)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(fields[9])
    names = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
            if any(f"socket:[{inode}]" in fds for inode in inodes):
                names.add((proc / "comm").read_text().strip())
        except OSError:
            continue
    return names


def replica_env(sid: int, deployment: str, key: str, timeout_s: float = 30.0) -> str | None:
    """`key` in the environment of the session's replica process of `deployment` (Linux /proc).

    Polls: on a loaded machine Ray may be replacing the replica (a missed health check) when first asked.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        titles = []
        for pid in _session_members(sid):
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
        while len(_session_members(shell.pid)) < len(commands) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        return shell

    bystander = subprocess.Popen(["sleep", "60"])  # in this test's own session: never touched
    named, whole = session_of("sleep 60", "sleep 60"), session_of("sleep 60")
    try:
        assert len(signal_session(named.pid, signal.SIGKILL, name="sleep")) == 2
        assert named.wait(timeout=10) == 0  # the shell's `wait` returned: both sleeps gone, the shell spared
        assert _session_members(named.pid) == []
        assert len(signal_session(whole.pid, signal.SIGKILL)) == 2  # the shell and its sleep
        assert whole.wait(timeout=10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for process in (named, whole, bystander):
            process.kill()
            process.wait()


def test_serve_run_with_the_dev_config(tmp_path: Path, tiny_model_dir: Path):
    """`serve run deploy/dev.yaml`, as `make serve-dev` does, in a Ray instance of its own."""
    config = yaml.safe_load((ROOT / "deploy" / "dev.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["model"] = f"local-dir:{tiny_model_dir}"
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = Path(sys.executable).parent / "serve"
    # Ray's environment from the launcher alone (not the tests' own), and HAProxy ports of its own: the
    # session's Ray instance holds the ones the tests' environment names
    env = {k: v for k, v in os.environ.items() if k not in one_machine_env()}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", **haproxy_ports()})
    launcher = [sys.executable, "-m", "serve_app.ray_env", "--small-cpu", "--"]  # as `make serve-dev`
    with open(tmp_path / "serve.log", "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [*launcher, str(serve), "run", "--address", "local", str(path)], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, "serve run exited early"
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # proxy up before the app
                pass
            time.sleep(1)
        else:
            pytest.fail("serve run did not become healthy in 180 s")
        response = requests.post(url + "/v1/embeddings", json={"input": "hello", "model": "tiny-clip"}, timeout=30)
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == 32
        # deploy/ray-serve.env is in effect: HAProxy, not Serve's Python proxy, holds the HTTP port; and so is
        # deploy/ray-small-cpu.env: the replicas that run torch see its OpenMP settings
        assert serve_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and listener_names(port) == {"haproxy"}
        assert replica_env(process.pid, "ClipEncoder", "GOMP_SPINCOUNT") == small_cpu_env()["GOMP_SPINCOUNT"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        signal_session(process.pid, signal.SIGKILL)  # its own session: whatever outlived `serve run` (HAProxy, once)
        process.wait()
