"""``benchmarks/run_all.py``: the JSON path lookup behind the README's benchmark table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from run_all import lookup, ratio_text  # noqa: E402


def test_lookup_follows_dots_indexes_and_keys_that_hold_dots():
    doc = {"demo": {"box_accuracy_t0.3": 0.49, "box_accuracy_t0": 9.0, "runs": [{"wall_s": 430.0}]},
           "a": {"b": {"c": 2}}}
    assert lookup(doc, "demo.box_accuracy_t0.3") == 0.49  # the longest matching key wins
    assert lookup(doc, "demo.box_accuracy_t0") == 9.0
    assert lookup(doc, "demo.runs[0].wall_s") == 430.0
    assert lookup(doc, "a.b.c") == 2
    assert lookup(doc, "_const.75") == 75.0
    for missing in ("demo.runs[1].wall_s", "a.b.d", "a.b.c.d", "nope"):
        assert lookup(doc, missing) is None, missing


def test_ratio_text_reads_the_right_way_round():
    assert "faster" in ratio_text(2.0, 4.0, "time") and "2.00x" in ratio_text(2.0, 4.0, "time")
    assert "the baseline" in ratio_text(3.9, 1.0, "cost")


def test_markdown_names_the_entries_a_merge_kept_from_earlier_runs():
    from run_all import markdown

    machine = {"cpu": "x", "cores": 2, "python": "3.11", "torch": "2", "load_average_start": [0.1]}
    entry = {"returncode": 0, "command": ["python", "a.py"], "result": {"speedup": 2.0}}
    doc = {"created": "2026-11-26T05:00:00+00:00", "machine": machine,
           "benchmarks": {"old": {**entry, "finished": "2026-11-25T01:00:00+00:00"},
                          "legacy": dict(entry),  # written before entries had a finish time
                          "new": {**entry, "finished": "2026-11-26T05:10:00+00:00"}}}
    md = markdown(doc)
    assert "From an earlier run" in md and "`old`, `legacy`." in md and "`new`" not in md.split("From an earlier run")[1]
    doc["benchmarks"] = {"new": doc["benchmarks"]["new"]}
    assert "From an earlier run" not in markdown(doc)
