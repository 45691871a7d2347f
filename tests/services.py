"""Real Redis and PostgreSQL servers for the tests: started from Debian's binaries on free loopback ports in a
temporary directory, owned by the test session, and stopped by their pid. Also an S3-compatible object store
(moto's server mode, from the `test` extra) for the batch files' object storage.

Real servers, not fakes: the tenancy code's Lua scripts, timeouts, reconnects and SQL dialect are what the tests
must exercise, and a server stopped under load is the fault that matters. `make services` (or CI's `.ci/run`)
installs the binaries. A missing binary is an error, not a skip: a skipped test would hide that nothing ran.
"""

import asyncio
import atexit
import concurrent.futures
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_app.ray_env import free_port

INSTALL_HINT = ("install Debian's redis-server and postgresql with `make services` (needs root or sudo); "
                "CI's .ci/run installs them before `make test`")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_running: set["_Server"] = set()  # stopped at interpreter exit should a session end without its finalizers


class MissingServerError(RuntimeError):
    """A server binary the tests need is not installed."""


def find_binary(name: str) -> str:
    """`name` on PATH, else in Debian's PostgreSQL directories (newest version first), where initdb and
    postgres live off PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise MissingServerError(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin: {INSTALL_HINT}")


def _version_key(directory: str) -> tuple[int, ...]:
    version = Path(directory).parent.name
    return tuple(int(p) for p in version.split(".") if p.isdigit())


class _Server:
    """One server process of this session: started on a free port kept across restarts, stopped by pid."""

    name = "server"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = self.directory / f"{self.name}.log"
        self._process: subprocess.Popen | None = None
        self._started_once = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the server and waits until it answers; a no-op on a running one. The first start moves to
        another free port should someone take the chosen one meanwhile; a restart keeps its port or fails."""
        if self.running:
            return
        for attempt in range(3):
            self._launch()
            if self._wait_ready():
                self._started_once = True
                _running.add(self)
                return
            if self._started_once or attempt == 2 or "in use" not in self._log_tail():
                raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{self._log_tail()}")
            self.port = free_port()

    def stop(self) -> None:
        """Stops the server by its pid (a clean shutdown, then SIGKILL) and waits for it to exit."""
        process, self._process = self._process, None
        _running.discard(self)
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((self._stop_signal, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            process.send_signal(sig)
            try:
                process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        """Stops the server; what it keeps on disk goes with the session's temporary directory."""
        self.stop()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ for the subclasses

    _stop_signal = signal.SIGTERM

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _popen_args(self) -> dict:
        return {}

    def _answers(self) -> bool:
        """True once the server that answers on the port is this one."""
        raise NotImplementedError

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, **self._popen_args())

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            try:
                if self._answers():
                    return True
            except Exception:  # not listening yet, or still starting up
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} on port {self.port} did not answer in {START_TIMEOUT_S:.0f} s:\n"
                           f"{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class RedisServer(_Server):
    """`redis-server` on 127.0.0.1 with no persistence (like the cluster's: rate-limit counters only), so a
    restart comes back empty on the same port."""

    name = "redis"

    def __init__(self, directory: Path) -> None:
        self.binary = find_binary("redis-server")
        super().__init__(directory)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        return [self.binary, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--port", str(self.port),
                "--daemonize", "no", "--dir", str(self.directory), "--logfile", ""]

    def _answers(self) -> bool:
        import redis

        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1) as client:
            return client.info("server")["process_id"] == self.pid


class PostgresServer(_Server):
    """A PostgreSQL cluster of its own (initdb on first start), role and database `clip` (password `clip`, the
    owner of its database, may create databases, no superuser), reached at `url` through SQLAlchemy's asyncpg
    driver. `app_role=False` leaves the cluster bare but for its superuser `postgres` (`superuser_password`).

    Postgres refuses to run as root: as root the cluster runs as the `postgres` OS user, in a directory of its
    own under the system's temporary directory (pytest's, under /tmp/pytest-of-root, is closed to other users),
    removed by `close()`. `fsync=off`: fast, and a crash of the test machine loses nothing that matters.
    """

    name = "postgres"
    _stop_signal = signal.SIGINT  # fast shutdown: ends client sessions instead of waiting for them

    def __init__(self, directory: Path, app_role: bool = True) -> None:
        self.binary = find_binary("postgres")
        beside = Path(self.binary).with_name("initdb")  # initdb of the same version where there is one
        self.initdb = str(beside) if os.access(beside, os.X_OK) else find_binary("initdb")
        super().__init__(directory)
        self.superuser_password = secrets.token_hex(16)
        self._role_ready = not app_role
        self._user: pwd.struct_passwd | None = None
        root = self.directory
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise MissingServerError(f"running as root, and no `postgres` OS user to run PostgreSQL as: "
                                         f"{INSTALL_HINT}") from None
            root = Path(tempfile.mkdtemp(prefix="clip-test-postgres-"))
            os.chown(root, self._user.pw_uid, self._user.pw_gid)
        self._root = root
        self.data_dir = root / "data"
        self.socket_dir = root / "run"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://clip:clip@127.0.0.1:{self.port}/clip"

    def start(self) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self._init_cluster()
        super().start()
        if not self._role_ready:
            _run(self._create_app_role())
            self._role_ready = True

    def restart(self) -> None:
        """Stops and starts the server on the same port and data directory (its pid changes)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._root != self.directory:
            shutil.rmtree(self._root, ignore_errors=True)

    def _popen_args(self) -> dict:
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": [], "cwd": self._root,
                "env": {**os.environ, "HOME": str(self._root), "USER": "postgres", "LOGNAME": "postgres"}}

    def _init_cluster(self) -> None:
        password_file = self._root / "superuser-password"
        password_file.write_text(self.superuser_password + "\n")
        self.socket_dir.mkdir(exist_ok=True)
        if self._user:
            for path in (password_file, self.socket_dir):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        try:
            with open(self.log_path, "ab") as log:
                done = subprocess.run(
                    [self.initdb, "-D", str(self.data_dir), "-U", "postgres", "--auth=scram-sha-256",
                     f"--pwfile={password_file}", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=120, **self._popen_args())
        finally:
            password_file.unlink(missing_ok=True)
        if done.returncode:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{self._log_tail()}")

    def _command(self) -> list[str]:
        return [self.binary, "-D", str(self.data_dir), "-p", str(self.port), "-k", str(self.socket_dir),
                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off"]

    async def _superuser(self):
        import asyncpg

        return await asyncpg.connect(host="127.0.0.1", port=self.port, user="postgres",
                                     password=self.superuser_password, database="postgres", timeout=2)

    def _answers(self) -> bool:
        async def data_directory() -> str:
            connection = await self._superuser()
            try:
                return await connection.fetchval("SHOW data_directory")
            finally:
                await connection.close()

        return Path(_run(data_directory())) == self.data_dir

    async def _create_app_role(self) -> None:
        connection = await self._superuser()
        try:
            if not await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = 'clip'"):
                await connection.execute("CREATE ROLE clip LOGIN CREATEDB PASSWORD 'clip'")
            if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = 'clip'"):
                await connection.execute("CREATE DATABASE clip OWNER clip")
        finally:
            await connection.close()


class MotoServer(_Server):
    """moto's S3-compatible server (`python -m moto.server`, its server mode) on 127.0.0.1, in memory: what
    pyarrow's S3 filesystem and boto3 talk to as they would to S3 or MinIO. Any credentials are accepted
    (`DUMMY_CREDENTIALS`); a restart comes back empty on the same port.

    `endpoint` is `host:port` (pyarrow's `endpoint_override`), `url` the endpoint as an http URL (boto3's
    `endpoint_url`); `store_uri(bucket, prefix)` a FileStore URI of a bucket made with `create_bucket`."""

    name = "moto"
    region = "us-east-1"
    DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, directory: Path) -> None:
        try:
            import moto.server  # noqa: F401
        except ImportError as exc:
            raise MissingServerError(f"moto's server mode is not installed ({exc}): install the `test` extra "
                                     "(`pip install -e .[test]`, which holds moto[server])") from None
        super().__init__(directory)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def store_uri(self, bucket: str, prefix: str = "") -> str:
        """A pyarrow filesystem URI (serve_app.batch.store.FileStore) of `bucket`/`prefix` on this server."""
        path = f"{bucket}/{prefix.strip('/')}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http&region={self.region}"

    def client(self):
        """A boto3 S3 client of this server, with dummy credentials."""
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=self.region,
                            aws_access_key_id=self.DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def create_bucket(self, name: str | None = None) -> str:
        """Creates a bucket (a fresh name by default) and returns its name."""
        name = name or f"bucket-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def _popen_args(self) -> dict:
        # Its own credentials and no proxy: what the server sees of the environment must not matter.
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        return {"env": {**env, **self.DUMMY_CREDENTIALS}}

    def _answers(self) -> bool:
        import urllib.request

        if self._process is None or not _listens(self._process.pid, self.port):
            return False  # still starting, or someone else's server holds the port
        with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2) as answer:
            return answer.status == 200


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening TCP socket on `port` (Linux: its fds against /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                return True
    return False


def _run(coroutine):
    """Runs `coroutine` to its end from plain code, or from code already inside an event loop (a test that
    restarts a server under load): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_running):
        server.close()
