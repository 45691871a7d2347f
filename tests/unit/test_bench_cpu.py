"""clip-bench cpu's accounting (no Ray): the CPU of a process tree, and the report's table and ratios."""

import os
import subprocess
import sys

from serve_app.bench.cpu import cpu_table, tree_cpu_s


BURN = """
import sys, time
while time.process_time() < 0.5:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""


def test_the_cpu_of_a_process_tree_counts_its_children():
    """A child that spends 0.5 s of CPU (its own clock, not the wall's) while this process waits."""
    before = tree_cpu_s(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "burnt"
        spent = tree_cpu_s(os.getpid()) - before
    finally:
        child.communicate("")
    assert spent >= 0.45  # /proc counts in clock ticks (10 ms)


def test_the_table_gives_each_row_and_the_ratio_of_the_layouts():
    row = {"payload": "text x1", "requests_per_s": 100.0, "items_per_s": 100.0, "cpu_ms_per_request": 6.0,
           "cpu_ms_per_item": 6.0, "cores_at_encoder_rate": 60.0, "errors": {}}
    report = {"settings": {"encoder_rate": 10_000.0}, "tokenizer_us_per_text": 70.0,
              "rows": [{**row, "layout": "pools"}, {**row, "layout": "one-process", "cpu_ms_per_request": 2.0}],
              "pools_over_one_process": {"text x1": 3.0}}
    table = cpu_table(report)
    assert "cores at 10,000 items/s" in table and "text x1: 3.0x" in table and table.count("text x1") == 3
