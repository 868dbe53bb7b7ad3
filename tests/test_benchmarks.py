"""`python -m benchmarks run --quick` produces every figure, finite (no speed is asserted: that is not a test's job)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the quick benchmark, in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_run_produces_every_figure(tmp_path):
    output = tmp_path / "results.json"
    readme_before = Path(ROOT, "README.md").read_text(encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert set(report["sections"]) == {"model", "converter", "tokenizer", "lowbit", "serving"}
    assert report["machine"]["read_bandwidth_gbps"] > 0 and report["machine"]["fp32_matmul_gflops"] > 0
    figures = [row["figure"] for rows in report["sections"].values() for row in rows]
    for expected in (
        "decode tokens/s, batch 1 (ours, dynamic graph)",
        "decode tokens/s, batch 8 (ours, dynamic graph)",
        "peak RSS",
        "bandwidth bound",
        "fp32 matmul rate",
        "Paddle Inference",
        "aggregate decode tokens/s, 8 concurrent streams",
        "time to first token p50, 16 streams",
        "time to first token p99, 4 streams",
        "8 streams vs an idle server",
    ):
        assert any(expected in figure for figure in figures), expected
    for rows in report["sections"].values():
        for row in rows:
            assert all(math.isfinite(row[key]) and row[key] >= 0 for key in ("ours", "peer", "ratio")), row
    assert "| model | decode tokens/s, batch 1" in done.stdout  # the markdown table
    _check_lowbit(report, "lowbit")
    assert Path(ROOT, "README.md").read_text(encoding="utf-8") == readme_before


def test_quick_full_depth_run_is_merged_into_the_previous_results(tmp_path):
    """The opt-in full-depth section (40 layers through the bf16 predictor; tiny here) adds its figures to the
    results of the previous run instead of replacing them."""
    output = tmp_path / "results.json"
    previous = {
        "date": "2026-01-01T00:00:00+00:00",
        "quick": True,
        "machine": {},
        "section_dates": {"tokenizer": "2026-01-01T00:00:00+00:00"},
        "sections": {
            "tokenizer": [{"figure": "kept", "ours": 1.0, "peer": 1.0, "peer_name": "x", "unit": "MB/s", "ratio": 1.0}]
        },
    }
    output.write_text(json.dumps(previous))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "full-depth", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert list(report["sections"]) == ["tokenizer", "full-depth"]
    assert report["sections"]["tokenizer"] == previous["sections"]["tokenizer"]
    figures = {row["figure"].split(" (")[0]: row for row in report["sections"]["full-depth"]}
    assert set(figures) == {"decode tokens/s, batch 1", "peak RSS of the predictor, decoding", "peak RSS of the export"}
    assert all(math.isfinite(row["ours"]) and row["ours"] > 0 for row in figures.values())
    assert "Sections measured on: tokenizer 2026-01-01, full-depth" in done.stdout


def _check_lowbit(report: dict, section: str):
    """The low-bit section has each of our formats against the bandwidth bound and the full-depth targets, the
    kernel path that ran in each figure, and either llama.cpp's figures beside ours or the reason it was skipped."""
    rows = report["sections"][section]
    notes = report["notes"][section]
    assert any(note.startswith("CPU flags:") for note in notes)
    peer_skipped = any("llama.cpp peer skipped" in note for note in notes)
    for fmt, kind in (("bf16", "BF16"), ("int8", "Q8_0"), ("int4", "Q4_0")):
        ours = [row for row in rows if f"(ours {fmt}, " in row["figure"]]
        assert {row["details"]["kernel"] for row in ours} and all(" kernels, " in row["figure"] for row in ours)
        assert any("bandwidth bound" in row["figure"] for row in ours), fmt
        assert any("weights' bytes + 1.5 GB" in row["figure"] for row in ours), fmt
        versus = [row for row in ours if row["peer_name"] == f"llama.cpp {kind}"]
        assert len(versus) == (0 if peer_skipped else 3), (fmt, notes)
    assert any("5 tokens/s target" in row["figure"] for row in rows)


def test_quick_lowbit_full_depth_runs_40_layers_and_keeps_its_own_notes(tmp_path):
    """The opt-in 40-layer low-bit section (tiny here) measures every format at full depth, against the issue's
    targets, and its notes sit beside the 2-layer section's instead of replacing them."""
    output = tmp_path / "results.json"
    previous = {
        "date": "2026-01-01T00:00:00+00:00",
        "quick": True,
        "machine": {},
        "notes": {"lowbit": ["kept"]},
        "section_dates": {"lowbit": "2026-01-01T00:00:00+00:00"},
        "sections": {
            "lowbit": [{"figure": "kept", "ours": 1.0, "peer": 1.0, "peer_name": "x", "unit": "tokens/s", "ratio": 1.0}]
        },
    }
    output.write_text(json.dumps(previous))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "lowbit-full-depth", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(output.read_text())
    assert list(report["sections"]) == ["lowbit", "lowbit-full-depth"]
    assert report["notes"]["lowbit"] == ["kept"]
    _check_lowbit(report, "lowbit-full-depth")
    assert all("40 layers" in row["figure"] for row in report["sections"]["lowbit-full-depth"])
    assert "- lowbit-full-depth: CPU flags:" in done.stdout


def test_quick_lowbit_with_some_formats_keeps_the_other_formats_rows(tmp_path):
    """`--formats int4` reruns only int4's rows: the previous bf16 row stays (with its own date), the previous
    int4 row of the same figure is replaced, and every new row says when it was measured."""
    from paddle_glm4 import kernels

    output = tmp_path / "results.json"
    old = "2026-01-01T00:00:00+00:00"

    def row(fmt):
        # a figure measured with or without the llama.cpp peer
        return {
            "figure": f"decode batch 1 vs the bandwidth bound (ours {fmt}, {kernels.isa()} kernels, tiny, 2 layers)",
            "ours": 1.0,
            "peer": 1.0,
            "peer_name": "x",
            "unit": "tokens/s",
            "ratio": 1.0,
            "date": old,
        }

    undated = {**row("int8"), "date": None}
    del undated["date"]  # a row from before rows were dated: it takes its section's date
    previous = {
        "date": old,
        "quick": True,
        "machine": {},
        "notes": {},
        "section_dates": {"lowbit": old},
        "sections": {"lowbit": [row("bf16"), undated, row("int4")]},
    }
    output.write_text(json.dumps(previous))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "run",
            "--quick",
            "--only",
            "lowbit",
            "--formats",
            "int4",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(output.read_text())["sections"]["lowbit"]
    assert rows[:2] == [row("bf16"), row("int8")]
    assert row("int4") not in rows
    new = rows[2:]
    assert new and all("ours int4" in r["figure"] or "Q4_0" in r["figure"] for r in new), [r["figure"] for r in new]
    assert all(r["date"] != old for r in new)
    assert not any(f"ours {fmt}," in r["figure"] for r in new for fmt in ("bf16", "int8"))
    assert "(measured 2026-01-01 00:00)" in done.stdout


def test_quick_long_context_run_reaches_every_context_and_is_plotted(tmp_path):
    """The opt-in long-context section: every planned context reached (a real prefill, or stored keys/values and a
    real last chunk), each figure finite; the plot script draws it and tabulates it."""
    from benchmarks import long_context

    output, png = tmp_path / "results.json", tmp_path / "long_context.png"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--only", "long-context", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(output.read_text())["sections"]["long-context"]
    for length, mode in long_context.QUICK_PLAN:
        how = "after a real prefill" if mode == "prefill" else "after stored keys/values"
        mine = [row for row in rows if f"({length} tokens," in row["figure"] and row["details"]["mode"] == mode]
        assert any(row["figure"].startswith("decode tokens/s") and how in row["figure"] for row in mine), length
        assert any(row["figure"].startswith("prefill tokens/s, last chunk") for row in mine), length
        assert any(row["figure"].startswith("prefill tokens/s, whole prompt") for row in mine) == (mode == "prefill")
        rss = next(row for row in mine if row["figure"].startswith("peak RSS"))
        assert rss["ours"] > 0 and rss["peer"] > 1.5  # the bound: weights + cache + 1.5 GB
    assert all(math.isfinite(row[key]) and row[key] > 0 for row in rows for key in ("ours", "peer", "ratio"))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plot_long_context", "--results", str(output), "--output", str(png)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(long_context.QUICK_PLAN)  # the header, then one line per context reached
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.plot_long_context", "--results", str(tmp_path / "none")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
