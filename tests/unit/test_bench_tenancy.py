"""`clip-bench tenancy`'s keys file and its on/off summary (the run itself needs Redis, PostgreSQL and two
services: see BENCHMARKS.md)."""

from serve_app.bench.tenancy import BENCH_SECRET, _keys_file, summarize, tenancy_table
from serve_app.tenancy.keys import parse_keys_file


def test_the_benchmarks_key_is_accepted_and_never_limited(tmp_path):
    key = parse_keys_file(_keys_file(tmp_path / "keys.yaml").read_text()).find(BENCH_SECRET.encode())
    assert key is not None and key.limits.requests_per_minute >= 10**9 and key.credit_nano_usd >= 10**15


def test_summary_averages_the_windows_of_each_variant():
    rows = [
        {"tenancy": "off", "payload": "text x1", "round": 1, "requests_per_s": 200.0, "cpu_ms_per_request": 4.0,
         "errors": {}},
        {"tenancy": "on", "payload": "text x1", "round": 1, "requests_per_s": 190.0, "cpu_ms_per_request": 4.5,
         "errors": {}},
        {"tenancy": "off", "payload": "text x1", "round": 2, "requests_per_s": 220.0, "cpu_ms_per_request": 3.0,
         "errors": {}},
        {"tenancy": "on", "payload": "text x1", "round": 2, "requests_per_s": 200.0, "cpu_ms_per_request": 3.5,
         "errors": {"429": 1}},
    ]
    summary = summarize(rows)["text x1"]
    assert summary["requests_per_s_off"] == 210.0 and summary["requests_per_s_on"] == 195.0
    assert summary["requests_per_s_on_over_off"] == round(195 / 210, 3)
    assert summary["tenancy_cpu_ms_per_request"] == 0.5
    table = tenancy_table({"rows": rows, "summary": summarize(rows)})
    assert "429: 1" in table and "0.929" in table
