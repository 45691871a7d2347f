"""serve_app.bench.report: percentiles, latency summaries and Markdown tables."""

import pytest

from serve_app.bench.report import format_table, latency_summary, percentile


def test_percentiles_interpolate_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([], 50) is None
    summary = latency_summary([0.001, 0.002, 0.003])
    assert summary["p50"] == pytest.approx(2.0) and summary["max"] == pytest.approx(3.0)
    assert latency_summary([])["p99"] is None


def test_format_table_is_markdown():
    table = format_table(["a", "bb"], [[1, None], ["xyz", 2.5]]).splitlines()
    assert table[0].startswith("| a ") and table[1].startswith("|---") and "xyz" in table[2 + 1]
