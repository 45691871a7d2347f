"""serve_app.bench.servers without starting a server: the Ray environment our server gets, and where
infinity-emb's CLI is found."""

import os
from pathlib import Path


def test_our_server_runs_ray_as_production_unless_the_caller_says_otherwise(monkeypatch, tmp_path: Path):
    from serve_app.bench.servers import OurServer
    from serve_app.ray_env import NODE_PORTS, serve_env

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")  # the caller measures the other mode
    server = OurServer(tmp_path, {"model": "x"})
    assert server.env["RAY_SERVE_ENABLE_HA_PROXY"] == serve_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert server.env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert server.env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "2"  # stops in seconds
    ports = {server.env[name] for name in NODE_PORTS}
    assert len(ports) == len(NODE_PORTS) and all(p.isdigit() for p in ports)  # its own, not 8404/9101/8500


def test_infinity_is_found_by_name_on_path_or_by_path(monkeypatch, tmp_path: Path):
    from serve_app.bench.servers import find_infinity

    binary = tmp_path / "bin" / "infinity_emb"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_infinity() is None and find_infinity(str(binary)) is None  # not executable yet
    binary.chmod(0o755)
    assert find_infinity(str(binary)) == str(binary)
    assert find_infinity() is None  # the default name, not on PATH
    monkeypatch.setenv("PATH", os.pathsep.join([str(binary.parent), str(tmp_path / "empty")]))
    assert find_infinity() == str(binary) and find_infinity("infinity_emb") == str(binary)
    assert find_infinity("no-such-infinity") is None
