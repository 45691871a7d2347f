"""PNG plots (matplotlib, the `bench` extra): throughput and p99 latency against the load level."""

from pathlib import Path
from typing import Any


def plot_load(report: dict[str, Any], path: str | Path) -> Path:
    """Items/s (left axis) and p99 latency (right axis) against concurrency or request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    by_rate = levels[0]["concurrency"] is None
    xs = [lv["rate"] if by_rate else lv["concurrency"] for lv in levels]
    throughput = [lv["items_per_s"] for lv in levels]
    p99 = [lv["latency_ms"]["p99"] if lv["latency_ms"]["p99"] is not None else float("nan") for lv in levels]
    fig, left = plt.subplots(figsize=(6.5, 4))
    left.plot(xs, throughput, "o-", color="tab:blue", label="throughput")
    left.set_xlabel("request rate (req/s)" if by_rate else "concurrency")
    left.set_ylabel(f"{report['payload'].get('modality', 'item')}s/s", color="tab:blue")
    left.set_ylim(bottom=0)
    if not by_rate and len(xs) > 1 and max(xs) / max(min(xs), 1) >= 8:
        left.set_xscale("log", base=2)
    right = left.twinx()
    right.plot(xs, p99, "s--", color="tab:red", label="p99 latency")
    right.set_ylabel("p99 latency (ms)", color="tab:red")
    right.set_ylim(bottom=0)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="upper left")
    errors = sum(lv["error_count"] for lv in levels)
    left.set_title(f"{report['payload']['kind']} → {report['url']}" + (f"  ({errors} errors)" if errors else ""))
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Writes a matplotlib figure as a PNG (folders created) and frees it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
