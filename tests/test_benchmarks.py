"""`python -m benchmarks run --quick` produces every figure, finite (no speed is asserted: that is not a test's job)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the quick benchmark, in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_run_produces_every_figure(tmp_path):
    output = tmp_path / "results.json"
    readme_before = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    done = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--quick", "--output", str(output)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report["sections"]) == {"model", "converter", "tokenizer"}
    assert report["machine"]["read_bandwidth_gbps"] > 0 and report["machine"]["fp32_matmul_gflops"] > 0
    figures = [row["figure"] for rows in report["sections"].values() for row in rows]
    for expected in ("decode tokens/s, batch 1 (ours, dynamic graph)", "decode tokens/s, batch 8 (ours, dynamic graph)",
                     "peak RSS", "bandwidth bound", "fp32 matmul rate", "Paddle Inference"):
        assert any(expected in figure for figure in figures), expected
    for rows in report["sections"].values():
        for row in rows:
            assert all(math.isfinite(row[key]) and row[key] >= 0 for key in ("ours", "peer", "ratio")), row
    assert "| model | decode tokens/s, batch 1" in done.stdout  # the markdown table
    assert open(os.path.join(ROOT, "README.md"), encoding="utf-8").read() == readme_before


def test_quick_full_depth_run_is_merged_into_the_previous_results(tmp_path):
    """The opt-in full-depth section (40 layers through the bf16 predictor; tiny here) adds its figures to the
    results of the previous run instead of replacing them."""
    output = tmp_path / "results.json"
    previous = {"date": "2026-01-01T00:00:00+00:00", "quick": True, "machine": {}, "section_dates": {
        "tokenizer": "2026-01-01T00:00:00+00:00"}, "sections": {"tokenizer": [
            {"figure": "kept", "ours": 1.0, "peer": 1.0, "peer_name": "x", "unit": "MB/s", "ratio": 1.0}]}}
    output.write_text(json.dumps(previous))
    done = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "full-depth",
                           "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert list(report["sections"]) == ["tokenizer", "full-depth"]
    assert report["sections"]["tokenizer"] == previous["sections"]["tokenizer"]
    figures = {row["figure"].split(" (")[0]: row for row in report["sections"]["full-depth"]}
    assert set(figures) == {"decode tokens/s, batch 1", "peak RSS of the predictor, decoding", "peak RSS of the export"}
    assert all(math.isfinite(row["ours"]) and row["ours"] > 0 for row in figures.values())
    assert "Sections measured on: tokenizer 2026-01-01, full-depth" in done.stdout
