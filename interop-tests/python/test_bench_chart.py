"""python-demo/bench_perf.py's chart (build/bench/bench.png) and its small helpers, on made-up
figures (never runs the benchmark): the chart is a real, non-trivial PNG when matplotlib is
present, and its absence is reported, not raised (the quick CI form must not fail then)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "python-demo"))
import bench_perf  # noqa: E402


def made_up_metrics() -> dict:
    throughput = {"parallel_memcpy_nhd_median": 30.0, "store_nhd_median": 25.0, "retrieve_nhd_median": 29.0,
                  "parallel_memcpy_hnd_median": 30.0, "store_hnd_median": 24.0, "retrieve_hnd_median": 28.0,
                  "disk_read_cold_median": 1.5, "disk_retrieve_cold_median": 1.7,
                  "scaling_store_empty_pool_median": 20.0, "scaling_store_full_pool_median": 19.0}
    for key in ("nhd_bf16_c256", "hnd_fp8_c16", "mla_bf16_c16"):
        throughput[f"layout_{key}_parallel_memcpy_median"] = 30.0
        throughput[f"layout_{key}_store_median"] = 26.0
        throughput[f"layout_{key}_retrieve_median"] = 29.0
    latencies = {"lookup_xxh3_raw_median": 4.0, "lookup_sha256_raw_median": 23.0,
                 "sha256_same_bytes_one_digest_median": 19.2}
    for length, value in ((1, 7.0), (8, 24.0), (32, 90.0), (128, 350.0)):
        latencies[f"scaling_lookup_sha256_{length}k_median"] = value
        latencies[f"scaling_lookup_xxh3_{length}k_median"] = value / 5
        latencies[f"scaling_lookup_raw_sha256_{length}k_median"] = value * 0.8
    return {"mode": "full", "machine": {"cpu_model": "test CPU", "cpus": 2, "git_commit": "0123456789abcdef"},
            "run": {"date_utc": "2026-01-01T00:00:00+00:00"}, "ratios": {}, "throughput_gbps": throughput,
            "latencies_us": latencies}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_chart_is_a_non_trivial_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sub" / "bench.png"
    assert bench_perf.write_chart(made_up_metrics(), str(path)) == str(path)
    width, height = png_size(path)
    assert width >= 800 and height >= 600, (width, height)
    assert path.stat().st_size > 20_000, "a chart with bars, labels and lines is more than a few bytes"


def test_chart_without_matplotlib_is_skipped_not_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    path = tmp_path / "bench.png"
    assert bench_perf.write_chart(made_up_metrics(), str(path)) is None
    assert not path.exists()
    assert "matplotlib is not available" in capsys.readouterr().out


def test_chart_with_only_the_quick_figures(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = made_up_metrics()
    metrics["throughput_gbps"] = {k: v for k, v in metrics["throughput_gbps"].items() if not k.startswith(("layout_", "disk_", "scaling_"))}
    path = tmp_path / "bench-quick.png"
    assert bench_perf.write_chart(metrics, str(path)) == str(path)
    assert png_size(path)[0] >= 800


def test_slope_is_the_least_squares_slope():
    assert bench_perf.slope([(1, 3.0), (2, 5.0), (4, 9.0)]) == pytest.approx(2.0)
    assert bench_perf.slope([(0, 1.0), (1, 2.0), (2, 2.0), (3, 4.0)]) == pytest.approx(0.9)


def test_readme_section_is_regenerated_between_its_markers(tmp_path):
    import json

    metrics = made_up_metrics()
    metrics["machine"].update({"memory_bytes": 24 * 2**30, "kernel": "6.1", "dotnet_sdk": "10.0"})
    metrics["run"].update({"load_average_before": 0.5, "load_average_after": 0.7})
    metrics["latencies_us"].update({"lookup_xxh3_median": 6.0, "lookup_sha256_median": 25.0})
    metrics["ratios"]["lookup_sha256_raw_vs_sha256_same_bytes_median"] = 23.0 / 19.2
    for kind, value in (("store", 0.85), ("retrieve", 0.95)):
        for statistic in ("median", "best"):
            metrics["ratios"][f"layout_hnd_fp8_c16_{kind}_vs_parallel_memcpy_{statistic}"] = value
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps(metrics))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{bench_perf.README_BEGIN}\nstale figures\n{bench_perf.README_END}\n\nafter\n")
    bench_perf.update_readme(str(bench_json), str(readme))
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "stale figures" not in text
    assert "| HND | fp8 | 16 | 30.0 | 26.0 | 29.0 | 0.85, 0.85 | 0.95, 0.95 |" in text
    assert "store: 1 of 1 rows below 0.9×" in text and "retrieve: 0 of 1 rows below 0.9×" in text
    assert "| sha256 lookup, µs | 7.0 | 24.0 | 90.0 | 350.0 |" in text
    assert "the sha256 lookup is **1.20×** a single digest" in text
    bench_perf.update_readme(str(bench_json), str(readme))  # idempotent
    assert readme.read_text() == text


def test_readme_without_markers_is_an_error(tmp_path):
    import json

    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps(made_up_metrics()))
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no generated bench section"):
        bench_perf.update_readme(str(bench_json), str(readme))
