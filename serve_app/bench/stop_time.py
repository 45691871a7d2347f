"""How long `serve run` takes to exit after Ctrl-C (SIGINT), with the environment given on the command line.

    python -m serve_app.bench.stop_time deploy/dev.yaml RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2

Starts `serve run --address local CONFIG` with deploy/ray-serve.env plus the KEY=VALUE arguments, waits
until `/health` answers 200 on the config's port, sends SIGINT and prints the seconds until it exited.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from serve_app.ray_env import serve_env


def main(argv: list[str]) -> int:
    config, *pairs = argv
    port = yaml.safe_load(Path(config).read_text())["http_options"]["port"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **serve_env(), **dict(p.split("=", 1) for p in pairs)}
    serve = Path(sys.executable).parent / "serve"
    process = subprocess.Popen([str(serve), "run", "--address", "local", config], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            print("not healthy in 180 s", file=sys.stderr)
            return 1
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(300)
        print(f"exited {process.returncode} {time.monotonic() - started:.1f} s after SIGINT")
        return 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
