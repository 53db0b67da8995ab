"""scripts/bench_check.py, the comparison of bench.json with committed thresholds, on made-up files
(never runs the benchmark). Also checks that the committed thresholds files parse."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import bench_check  # noqa: E402

THRESHOLDS = {
    "about": "test thresholds",
    "ratios": {"store_nhd_vs_memcpy_median": {"min": 0.6, "reason": "store keeps up with memcpy"}},
    "latencies_us": {"lookup_xxh3_raw_median": {"max": 8.0, "target": 5.0, "met": True, "reason": "lookup is cheap"}},
}


def results(store=0.92, lookup=4.0) -> dict:
    document = {"schema": 1, "mode": "full", "ratios": {}, "latencies_us": {}}
    if store is not None:
        document["ratios"]["store_nhd_vs_memcpy_median"] = store
    if lookup is not None:
        document["latencies_us"]["lookup_xxh3_raw_median"] = lookup
    return document


def run_files(tmp_path, bench, thresholds) -> tuple[int, str, str]:
    bench_path, thresholds_path = tmp_path / "bench.json", tmp_path / "thresholds.json"
    bench_path.write_text(bench if isinstance(bench, str) else json.dumps(bench))
    thresholds_path.write_text(thresholds if isinstance(thresholds, str) else json.dumps(thresholds))
    out, err = io.StringIO(), io.StringIO()
    code = bench_check.run(str(bench_path), str(thresholds_path), "bench", out, err)
    return code, out.getvalue(), err.getvalue()


def metric_line(output: str, metric: str) -> str:
    return next(line for line in output.splitlines() if metric in line)


def test_met_thresholds_pass(tmp_path):
    code, out, err = run_files(tmp_path, results(), THRESHOLDS)
    assert code == 0, out + err
    assert metric_line(out, "ratios.store_nhd_vs_memcpy_median").startswith("ok ")
    assert metric_line(out, "latencies_us.lookup_xxh3_raw_median").startswith("ok ")
    assert out.splitlines()[-1] == "bench: 2 passed, 0 failed"


def test_a_value_on_the_bound_passes(tmp_path):
    code, out, _ = run_files(tmp_path, results(store=0.6, lookup=8.0), THRESHOLDS)
    assert code == 0, out


@pytest.mark.parametrize("store, lookup, failing", [
    (0.59, 4.0, "ratios.store_nhd_vs_memcpy_median"),  # below a min
    (0.92, 8.5, "latencies_us.lookup_xxh3_raw_median"),  # above a max
])
def test_a_missed_threshold_fails(tmp_path, store, lookup, failing):
    code, out, _ = run_files(tmp_path, results(store, lookup), THRESHOLDS)
    assert code == 1
    line = metric_line(out, failing)
    assert line.startswith("FAIL") and "[" in line  # the reason is shown on a failure
    assert out.splitlines()[-1] == "bench: 1 passed, 1 failed"


def test_a_missing_metric_is_reported_as_a_failure(tmp_path):
    code, out, _ = run_files(tmp_path, results(lookup=None), THRESHOLDS)
    assert code == 1
    line = metric_line(out, "latencies_us.lookup_xxh3_raw_median")
    assert line.startswith("FAIL") and "missing" in line


def test_a_missing_section_and_a_non_number_fail(tmp_path):
    document = {"ratios": {"store_nhd_vs_memcpy_median": "fast"}}
    code, out, _ = run_files(tmp_path, document, THRESHOLDS)
    assert code == 1
    assert "not a finite number" in metric_line(out, "ratios.store_nhd_vs_memcpy_median")
    assert "missing" in metric_line(out, "latencies_us.lookup_xxh3_raw_median")
    assert out.splitlines()[-1] == "bench: 0 passed, 2 failed"


def test_an_unmet_target_stays_visible(tmp_path):
    thresholds = {"ratios": {"store_nhd_vs_memcpy_median": {"min": 0.4, "target": 0.9, "met": False,
                                                            "reason": "gap to the goal"}}}
    code, out, _ = run_files(tmp_path, results(store=0.5), thresholds)
    assert code == 0
    assert "target 0.9, not met" in metric_line(out, "store_nhd_vs_memcpy_median")
    code, out, _ = run_files(tmp_path, results(store=0.95), thresholds)
    assert code == 0
    assert "target reached" in metric_line(out, "store_nhd_vs_memcpy_median")


@pytest.mark.parametrize("thresholds", [
    "{not json",
    "[]",
    {},
    {"ratios": []},
    {"ratios": {"x": 0.5}},
    {"ratios": {"x": {"reason": "no bound"}}},
    {"ratios": {"x": {"min": 0.5, "max": 2, "reason": "both bounds"}}},
    {"ratios": {"x": {"min": "0.5", "reason": "string bound"}}},
    {"ratios": {"x": {"min": True, "reason": "boolean bound"}}},
    {"ratios": {"x": {"min": 0.5}}},
    {"ratios": {"x": {"min": 0.5, "reason": " "}}},
    {"ratios": {"x": {"mni": 0.5, "reason": "typo"}}},
    {"ratios": {"x": {"min": 0.5, "reason": "r", "target": "high"}}},
    {"ratios": {"x": {"min": 0.5, "reason": "r", "target": 0.9, "met": "no"}}},
    {"ratios": {"x": {"min": 0.5, "reason": "r", "met": False}}},
], ids=lambda t: t if isinstance(t, str) else json.dumps(t)[:60])
def test_a_malformed_thresholds_file_is_an_error(tmp_path, thresholds):
    code, out, err = run_files(tmp_path, results(), thresholds)
    assert code == 2
    assert "bench_check:" in err
    assert "passed" not in out  # nothing was checked


def test_unreadable_files_are_errors(tmp_path):
    code, _, err = run_files(tmp_path, "{truncated", THRESHOLDS)
    assert code == 2 and "bench.json" in err
    out, err = io.StringIO(), io.StringIO()
    assert bench_check.run(str(tmp_path / "absent.json"), str(tmp_path / "thresholds.json"), "bench", out, err) == 2


def test_main_reads_the_name_and_rejects_bad_usage(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps(results()))
    (tmp_path / "thresholds.json").write_text(json.dumps(THRESHOLDS))
    code = bench_check.main(["bench_check.py", str(tmp_path / "bench.json"), str(tmp_path / "thresholds.json"),
                             "--name", "quick"])
    assert code == 0
    assert capsys.readouterr().out.splitlines()[-1] == "quick: 2 passed, 0 failed"
    assert bench_check.main(["bench_check.py", str(tmp_path / "bench.json")]) == 2


@pytest.mark.parametrize("name", ["bench_thresholds.json", "bench_thresholds_quick.json"])
def test_the_committed_thresholds_parse(name):
    thresholds = bench_check.load_thresholds(str(REPO_ROOT / "python-demo" / name))
    assert thresholds
    for threshold in thresholds:
        assert threshold.section in ("ratios", "throughput_gbps", "latencies_us", "scaling")
        if threshold.met is False:  # an unmet goal is committed below the goal
            assert (threshold.limit < threshold.target if threshold.bound == "min"
                    else threshold.limit > threshold.target)
