"""The real Redis and PostgreSQL servers of tests/services.py: they answer, stop, and come back on the same port,
the way the tenancy tests use them (Redis stopped under load, PostgreSQL restarted with its data)."""

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import pytest
import redis

from tests.services import MissingServerError, PostgresServer, RedisServer, find_binary

ROOT = Path(__file__).resolve().parents[2]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_redis_stops_refuses_and_restarts_on_its_port(redis_server: RedisServer):
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    client.set("test-services:key", "value")
    assert client.get("test-services:key") == b"value"
    port, pid = redis_server.port, redis_server.pid
    redis_server.stop()
    try:
        assert gone(pid) and redis_server.pid is None
        with pytest.raises(redis.ConnectionError):
            client.ping()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        redis_server.start()
    assert (redis_server.port, redis_server.url) == (port, f"redis://127.0.0.1:{port}/0") and redis_server.pid != pid
    assert client.get("test-services:key") is None  # no persistence: a restarted Redis comes back empty
    client.set("test-services:key", "again")
    assert client.get("test-services:key") == b"again"
    client.close()


def test_postgres_keeps_its_data_across_a_restart(postgres_server: PostgresServer):
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run(*statements: str):
        engine = create_async_engine(postgres_server.url)
        try:
            async with engine.begin() as connection:
                for statement in statements:
                    result = await connection.execute(text(statement))
                return result.all() if result.returns_rows else None
        finally:
            await engine.dispose()

    asyncio.run(run("DROP TABLE IF EXISTS test_services",
                    "CREATE TABLE test_services (id serial PRIMARY KEY, note text NOT NULL)",
                    "INSERT INTO test_services (note) VALUES ('kept')"))
    port, pid = postgres_server.port, postgres_server.pid
    postgres_server.restart()
    assert postgres_server.port == port and postgres_server.pid != pid and gone(pid)
    assert asyncio.run(run("SELECT note FROM test_services")) == [("kept",)]
    # the app's role owns its database and is no superuser
    assert asyncio.run(run("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")) == \
        [("clip", False)]
    asyncio.run(run("DROP TABLE test_services"))


def test_postgres_init_script_of_the_cluster_creates_the_app_role(tmp_path: Path):
    """k8s/tenancy/postgres-init.sh, as the postgres image's entrypoint runs it on first start, leaves a role
    `clip` (no superuser) that owns database `clip` and logs in with the Secret's password."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    password_file = tmp_path / "database-password"
    password_file.write_text("s3cret-from-the-secret\n")
    with PostgresServer(tmp_path / "bare", app_role=False) as server:
        environ = {**os.environ, "POSTGRES_USER": "postgres", "PGHOST": "127.0.0.1", "PGPORT": str(server.port),
                   "PGPASSWORD": server.superuser_password, "CLIP_DATABASE_PASSWORD_FILE": str(password_file),
                   "PATH": f"{Path(find_binary('psql')).parent}:{os.environ['PATH']}"}
        subprocess.run(["bash", "-euo", "pipefail", "-c", 'source "$1"', "init",
                        str(ROOT / "k8s" / "tenancy" / "postgres-init.sh")], env=environ, check=True, timeout=60)

        async def who() -> list:
            url = f"postgresql+asyncpg://clip:s3cret-from-the-secret@127.0.0.1:{server.port}/clip"
            engine = create_async_engine(url)
            try:
                async with engine.begin() as connection:
                    await connection.execute(text("CREATE TABLE owned (id int)"))
                    return (await connection.execute(text(
                        "SELECT current_user, rolsuper, pg_get_userbyid(datdba) FROM pg_roles, pg_database "
                        "WHERE rolname = current_user AND datname = current_database()"))).all()
            finally:
                await engine.dispose()

        assert asyncio.run(who()) == [("clip", False, "clip")]


def test_missing_binaries_name_the_command_that_installs_them(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("tests.services.glob.glob", lambda pattern: [])
    for server in (RedisServer, PostgresServer):
        with pytest.raises(MissingServerError, match=r"make services.*\.ci/run"):
            server(tmp_path / server.name)
