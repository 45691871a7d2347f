"""CPU used by each process of the machine over a window, in cores (from /proc; Linux only).

    python -m serve_app.bench.cpu_by_process 12      # while a `clip-bench load` level runs

Prints the busiest processes (cores = CPU seconds / wall seconds), how often their threads were switched
out per second (voluntary + involuntary context switches: each one is a wake-up or a preemption that an
OpenMP thread sharing the cores may have to wait out) and the machine's totals.
"""

import os
import sys
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all of a process's threads so far."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split(":")[1])
        except OSError:
            continue
    return total


def _stat_cpu(stat: str) -> float:
    """User + system CPU seconds from a /proc `stat` line (a process's or one thread's)."""
    fields = stat[stat.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def thread_times(pid: int) -> dict[int, tuple[str, float, int, int]]:
    """tid -> (name, CPU seconds, voluntary, involuntary context switches so far) of each thread of a process."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        threads[int(task.name)] = (stat[stat.find("(") + 1 : stat.rfind(")")], _stat_cpu(stat),
                                   int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"]))
    return threads


def cpu_seconds() -> dict[int, tuple[str, float, int]]:
    """pid -> (command line, user + system CPU seconds so far, context switches so far)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out[int(entry.name)] = (cmd or stat[stat.find("(") + 1 : stat.rfind(")")], _stat_cpu(stat),
                                context_switches(int(entry.name)))
    return out


def usage(seconds: float, pids: set[int] | None = None) -> tuple[list[tuple[float, float, str]], float]:
    """(cores, switches/s, command) of each process (of `pids`, if given) over the next `seconds`, and the
    wall time measured. A process born during the window counts from zero: all its CPU and switches are inside."""
    before, started = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    after, wall = cpu_seconds(), time.monotonic() - started
    started_inside = ("", 0.0, 0)
    rows = [
        ((cpu - before.get(pid, started_inside)[1]) / wall, (switches - before.get(pid, started_inside)[2]) / wall, cmd)
        for pid, (cmd, cpu, switches) in after.items()
        if pids is None or pid in pids
    ]
    return rows, wall


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 10.0
    rows, wall = usage(seconds)
    used = sorted((cores, switches, cmd[:90]) for cores, switches, cmd in rows)
    for cores, switches, cmd in reversed(used[-14:]):
        print(f"{cores:6.2f} cores {switches:7.0f} switches/s  {cmd}")
    print(f"total {sum(u[0] for u in used):.2f} cores, {sum(u[1] for u in used):.0f} switches/s over {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
