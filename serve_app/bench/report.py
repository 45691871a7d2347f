"""Shared reporting: percentiles, the machine a number was measured on, JSON files, process RSS, tables."""

import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/mean/min/max in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms) if ms else None,
        "min": min(ms) if ms else None,
        "max": max(ms) if ms else None,
    }


def machine_info() -> dict[str, Any]:
    """What a number was measured on; the load average shows how busy the shared machine was."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg": loadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def git_state(directory: str | Path | None = None) -> dict[str, Any] | None:
    """The commit a number was measured at, and whether the work tree had local changes."""
    import subprocess

    cwd = str(directory or Path(__file__).resolve().parents[2])
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "__dict__"):
        return vars(value)
    return str(value)


# ------------------------------------------------------------------ processes (Linux /proc, by pid only)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            try:
                kids += [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (those that are still its descendants: Ray's workers are)."""
    seen, stack = [], [pid]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.append(current)
        stack.extend(_children(current))
    return seen


def process_rss(pid: int) -> tuple[str, int] | None:
    """(command line or title, resident bytes) of one process, None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return cmdline, int(line.split()[1]) * 1024
    return cmdline, 0


def tree_rss(pid: int) -> list[dict[str, Any]]:
    """RSS of every process in the tree, largest first."""
    rows = []
    for child in process_tree(pid):
        info = process_rss(child)
        if info is not None:
            rows.append({"pid": child, "cmd": info[0][:120], "rss_mib": round(info[1] / 2**20, 1)})
    return sorted(rows, key=lambda r: -r["rss_mib"])


REPLICA_MARK = "ServeReplica:"  # what a Serve replica's process title holds before its app:deployment


def replica_rss(root_pid: int) -> dict[str, dict[str, Any]]:
    """RSS (MiB) of each Serve replica process under `root_pid`, keyed by pid, with its app:deployment name."""
    rows = {}
    for row in tree_rss(root_pid):
        cmd = row["cmd"]
        if REPLICA_MARK in cmd:
            rows[str(row["pid"])] = {"replica": cmd.split(REPLICA_MARK, 1)[1].split()[0], "rss_mib": row["rss_mib"]}
    return rows


# ------------------------------------------------------------------ text tables


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (readable in a terminal too)."""
    rows = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)])


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"
