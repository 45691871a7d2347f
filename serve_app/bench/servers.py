"""The servers `compare` starts as subprocesses: ours (`serve run`), the naive baseline and infinity-emb.

Each runs in its own session (process group) on a free loopback port, with its log in the work directory.
Stopping is by process id only: SIGINT to the server's own pid (so `serve run` shuts Serve and its local Ray
down cleanly), then SIGTERM and SIGKILL to whatever is still left in that session, found by session id.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from serve_app.bench.report import tree_rss
from serve_app.processes import session_members as _session_members
from serve_app.processes import end_session
from serve_app.ray_env import free_port, node_ports, one_machine_env


class ManagedServer:
    """A server subprocess: start, wait until a real request succeeds, measure RSS, stop."""

    name = "server"

    def __init__(self, workdir: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        self.env.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / f"{self.name}.log"
        self.started_at: float | None = None
        self.startup_s: float | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "ManagedServer":
        self.prepare()
        log = open(self.log_path, "wb")
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd(),
            env=self.env, start_new_session=True,
        )
        log.close()
        return self

    def prepare(self) -> None:
        """Files the server needs before it starts (configs, model directories)."""

    def cwd(self) -> str | None:
        return None

    def wait_ready(self, payload: Any, timeout_s: float) -> float:
        """Seconds from spawn until the first real request succeeded (the startup time)."""
        from serve_app.bench.loadgen import wait_until_serving

        assert self.process is not None and self.started_at is not None
        try:
            wait_until_serving(self.base_url, payload, timeout_s, self.process)
        except Exception as exc:
            raise RuntimeError(f"{self.name} did not come up: {exc}; log tail:\n{self.log_tail()}") from exc
        self.startup_s = time.perf_counter() - self.started_at
        return self.startup_s

    def session_pids(self) -> list[int]:
        """Every live process of the server's session (Ray's raylet, GCS, actors and replicas included)."""
        return _session_members(self.process.pid) if self.process is not None else []

    def rss(self) -> list[dict[str, Any]]:
        """RSS of the server's processes (Ray's replicas are separate processes: one row each)."""
        return tree_rss(self.process.pid) if self.process is not None else []

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None:
            return
        sid = self.process.pid  # start_new_session: the session id is the server's own pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.process.poll()  # reaps the leader if it has exited
        end_session(sid)  # whatever outlived it in its session
        if self.process.poll() is None:
            self.process.wait(5)
        self.process = None

    def __enter__(self) -> "ManagedServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class OurServer(ManagedServer):
    """Our service through `serve run` with a generated YAML config (free port, its own local Ray)."""

    name = "ours"

    def __init__(self, workdir: Path, app_args: dict[str, Any], port: int | None = None,
                 import_path: str = "serve_app.app:build_app", **kw: Any) -> None:
        # Ray runs as in production (deploy/ray-serve.env); a variable set in the caller's environment wins,
        # so `RAY_SERVE_THROUGHPUT_OPTIMIZED=0 clip-bench compare ...` measures the other mode.
        # Its own HAProxy ports even when the caller's environment names some (the tests' Ray holds those).
        ray_env = {k: v for k, v in one_machine_env().items() if k not in os.environ} | node_ports()
        kw["env"] = {**ray_env, **(kw.get("env") or {})}
        super().__init__(workdir, port, **kw)
        self.app_args = app_args
        self.import_path = import_path  # any `module:builder` taking the same args is measured the same way
        self.config_path = self.workdir / "serve-config.yaml"

    def prepare(self) -> None:
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "applications": [
                {"name": "clip", "route_prefix": "/", "import_path": self.import_path, "args": self.app_args}
            ],
        }
        # JSON is valid YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def command(self) -> list[str]:
        serve = Path(sys.executable).parent / "serve"
        # `--address local`: always a fresh local Ray for this run, never a cluster found on the machine.
        return [str(serve), "run", "--address", "local", str(self.config_path)]

    def cwd(self) -> str | None:
        # The repo root: serve_app importable as in `serve run`.
        return str(Path(__file__).resolve().parents[2])


class NaiveServer(ManagedServer):
    name = "naive"

    def __init__(self, workdir: Path, model: str, pretrained: str | None, threads: int | None,
                 served_name: str, port: int | None = None, **kw: Any) -> None:
        super().__init__(workdir, port, **kw)
        self.model, self.pretrained, self.threads, self.served_name = model, pretrained, threads, served_name

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "serve_app.bench.naive_server", "--model", self.model,
               "--port", str(self.port), "--served-model-name", self.served_name]
        if self.pretrained:
            cmd += ["--pretrained", self.pretrained]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        return cmd

    def cwd(self) -> str | None:
        return str(Path(__file__).resolve().parents[2])


def find_infinity(binary: str = "infinity_emb") -> str | None:
    """infinity-emb's CLI: `binary` as a path (when it has a slash) or a name looked up on PATH; None when
    it is not there or not executable."""
    candidate = binary if os.sep in binary else shutil.which(binary)
    if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
        return str(Path(candidate).absolute())
    return None


class InfinityServer(ManagedServer):
    """infinity-emb v2 serving a random-weight HF CLIPModel (ViT-B/32 sizes) built offline by `hf_clip.py`."""

    name = "infinity"

    def __init__(self, workdir: Path, binary: str, served_name: str, batch_size: int = 32,
                 port: int | None = None, extra_args: list[str] | None = None, **kw: Any) -> None:
        # no telemetry: this machine reaches no outside address, and a benchmark must not try
        kw["env"] = {"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", **(kw.get("env") or {})}
        super().__init__(workdir, port, **kw)
        self.binary = binary
        self.served_name = served_name
        self.batch_size = batch_size
        self.extra_args = extra_args or []
        self.model_dir = self.workdir / "hf-clip-vit-b-32"

    def prepare(self) -> None:
        if (self.model_dir / "config.json").is_file():
            return
        import open_clip

        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        python = Path(self.binary).parent / "python"
        script = Path(__file__).with_name("hf_clip.py")
        subprocess.run([str(python), str(script), str(self.model_dir), "--bpe", str(bpe)], check=True,
                       env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)

    def command(self) -> list[str]:
        return [
            self.binary, "v2", "--model-id", str(self.model_dir), "--served-model-name", self.served_name,
            "--host", "127.0.0.1", "--port", str(self.port), "--url-prefix", "/v1", "--engine", "torch", "--device", "cpu",
            "--batch-size", str(self.batch_size), "--no-vector-disk-cache", "--log-level", "warning",
            *self.extra_args,
        ]
