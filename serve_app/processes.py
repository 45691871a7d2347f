"""Processes by session and ports by listener (Linux /proc): what `python -m serve_app.ray_env` needs to stop
everything a `serve run` started, and to say who holds a port it needs.

Ray starts HAProxy with no tie to its parent: when a stopping `serve run` loses the race with Ray's teardown,
HAProxy stays behind under pid 1, holding the HTTP and its side ports. A command started in a session of its own
leaves every process it started in that session, so they can be found and stopped by session id, never by name.
"""

import os
import signal
import subprocess
import time
from pathlib import Path


def session_members(sid: int) -> list[int]:
    """Pids whose session id is `sid` (field 6 of /proc/PID/stat)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":  # zombies are gone already
            members.append(int(entry.name))
    return members


def signal_session(sid: int, sig: int, name: str | None = None) -> list[int]:
    """Sends `sig` to the processes of session `sid` (those whose name is `name`, when given), never to the
    caller; returns their pids."""
    sent = []
    for pid in session_members(sid):
        try:
            if pid == os.getpid() or (name and Path(f"/proc/{pid}/comm").read_text().strip() != name):
                continue
            os.kill(pid, sig)
            sent.append(pid)
        except OSError:  # gone meanwhile
            pass
    return sent


def end_session(sid: int, grace_s: float = 10.0) -> None:
    """SIGTERM to whatever is left in session `sid`, then SIGKILL to what outlives `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not signal_session(sid, sig):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_members(sid):
            time.sleep(0.2)


def listeners(port: int) -> set[str]:
    """Names of the processes listening on local TCP `port` (/proc/net/tcp*, then socket inodes)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(fields[9])
    names = set()
    if not inodes:
        return names
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
            if any(f"socket:[{inode}]" in fds for inode in inodes):
                names.add(f"{(proc / 'comm').read_text().strip()} (pid {proc.name})")
        except OSError:
            continue
    return names or {"another user's process"}


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_own_session(command: list[str], env: dict[str, str]) -> int:
    """Runs `command` in a session of its own; SIGINT, SIGTERM and SIGHUP are passed on to it; once it has
    exited, whatever it left in its session is ended too. Returns its exit status."""
    # Ctrl-C must reach it even when this launcher was started with SIGINT ignored (a shell's background job,
    # `make ... &`): the command starts with SIGINT's default, so that `serve run` installs its own handler.
    process = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_sigint_default)

    def forward(sig: int, _frame: object) -> None:
        try:
            process.send_signal(sig)
        except OSError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    status = process.wait()
    end_session(process.pid)
    return status
