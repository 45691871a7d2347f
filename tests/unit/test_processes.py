"""serve_app.processes: a command run in a session of its own gets Ctrl-C even when the launcher was started
with SIGINT ignored (a shell's background job), and nothing it started outlives it."""

import signal
import subprocess
import sys
import time

# The launcher, started with SIGINT ignored; its command reports whether SIGINT reached it, then starts a
# grandchild that would outlive it, and waits.
LAUNCHER = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
from serve_app.processes import run_in_own_session
child = '''
import signal, subprocess, sys, time
grandchild = subprocess.Popen(["sleep", "300"])
print("grandchild", grandchild.pid, flush=True)
try:
    time.sleep(300)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
'''
sys.exit(run_in_own_session([sys.executable, "-c", child], {}))
"""


def test_ctrl_c_reaches_the_command_and_nothing_outlives_it():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    try:
        line = launcher.stdout.readline()
        assert line.startswith("grandchild"), line
        grandchild = int(line.split()[1])
        time.sleep(0.5)  # the command is in its sleep
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=30) == 3  # the command's own exit status, after its KeyboardInterrupt
        assert "interrupted" in launcher.stdout.read()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{grandchild}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except FileNotFoundError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the command's grandchild outlived it")
    finally:
        launcher.kill()
        launcher.wait()
