"""CPU used by each process of the machine over a window, in cores (from /proc; Linux only).

    python -m serve_app.bench.cpu_by_process 12      # while a `clip-bench load` level runs

Prints the busiest processes (cores = CPU seconds / wall seconds) and the machine's total.
"""

import os
import sys
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds so far)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry.name)] = (cmd or stat[stat.find("(") + 1 : stat.rfind(")")], (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def main(argv: list[str]) -> int:
    seconds = float(argv[0]) if argv else 10.0
    before, started = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    after, wall = cpu_seconds(), time.monotonic() - started
    used = sorted(((cpu - before.get(pid, ("", 0.0))[1]) / wall, cmd[:90]) for pid, (cmd, cpu) in after.items())
    for cores, cmd in reversed(used[-14:]):
        print(f"{cores:6.2f} cores  {cmd}")
    print(f"total {sum(c for c, _ in used):.2f} cores over {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
