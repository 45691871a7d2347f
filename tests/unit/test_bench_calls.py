"""clip-bench calls' arithmetic and tables (no Ray), and the concurrency-1 columns of clip-bench cpu's table."""

from serve_app.bench.cpu import cpu_table
from serve_app.bench.ray_calls import CallsSettings, _hop_per_image, _kinds, _label, calls_table


def row(kind: str, net: float) -> dict:
    return {"kind": kind, "calls_per_s": 100.0, "cpu_us_per_call": net + 10, "net_cpu_us_per_call": net,
            "cpu_us_per_call_by_process": {"caller": net / 2, "enc": net / 2, "raylet": 1.0},
            "latency_ms_at_concurrency": {"p50": 30.0}, "c1_p50_ms": 2.0}


def test_the_hop_per_image_is_the_difference_to_the_same_two_calls_without_pixels_over_the_images():
    rows = [row("image x0", 5000), row("image x1", 5400), row("image x8", 13000),
            row("image x0 by reference", 9000), row("image x8 by reference", 14600), row("text x1", 2000)]
    assert _hop_per_image(rows) == {"image x1": 400.0, "image x8": 1000.0, "image x8 by reference": 700.0}


def test_every_kind_is_measured_once_with_a_label_of_its_own():
    kinds = _kinds(CallsSettings(text_rows=[1, 16], images=[1, 8]))
    labels = [_label(*k) for k in kinds]
    assert len(set(labels)) == len(labels)
    assert {"noop", "text x16 numpy", "image x0", "image x8 numpy", "image x1 by reference"} <= set(labels)


def test_the_calls_table_names_each_kind_and_the_hop():
    rows = [row("noop", 1600), row("image x0", 5000), row("image x1", 5400)]
    table = calls_table({"rows": rows, "idle_cpu_cores": 0.1, "hop_per_image": _hop_per_image(rows)})
    assert "| noop" in table and "caller 800" in table and "raylet" not in table  # under 5 µs: left out
    assert "image x1: 400.0 µs" in table


def test_the_cpu_table_shows_the_lone_client_beside_the_loaded_window():
    base = {"payload": "text x1", "requests_per_s": 100.0, "items_per_s": 100.0, "cpu_ms_per_request": 6.0,
            "cpu_ms_per_item": 6.0, "cores_at_encoder_rate": 60.0, "errors": {}}
    report = {"settings": {"encoder_rate": 10_000.0}, "tokenizer_us_per_text": 70.0,
              "rows": [{**base, "layout": "pools", "c1_p50_ms": 9.87, "c1_cpu_ms_per_request": 11.1,
                        "c1_errors": {"503": 1}}, {**base, "layout": "one-process"}],
              "pools_over_one_process": {"text x1": 1.0}}
    table = cpu_table(report)
    assert "c=1 p50 ms" in table and "9.87" in table and "503: 1" in table
