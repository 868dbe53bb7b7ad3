"""The machine's read-bandwidth probe (benchmarks/read_bandwidth.c through benchmarks.machine) and how the low-bit
benchmark turns its before / after readings into a bound. No speed is asserted: a rate is only checked to be a
rate, and every path's correctness rests on the probe's own check that it read each word of its buffer once."""

import itertools
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import lowbit, machine
from conftest import run_python_json

ROOT = str(Path(__file__).resolve().parents[1])


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").exists() else ""
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


PATHS = ["scalar"] + [isa for isa, flag in (("avx2", "avx2"), ("avx512", "avx512f")) if flag in _cpu_flags()]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of our own, so that the test builds the probe itself."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_path_this_cpu_has_reads_the_whole_buffer_at_a_positive_rate(isa, threads):
    """3 threads on 2 cores too: a thread count that does not divide the buffer evenly in pages."""
    reading = machine.stream_read(0.012, passes=3, threads=threads, isa=isa)
    assert reading.rate > 0 and 0 < reading.median <= reading.rate
    assert f"({isa}, {threads} threads, " in reading.method and "best of 3" in reading.method


def test_the_default_is_every_core_and_the_widest_path():
    reading = machine.stream_read(0.01, passes=2)
    assert f"({PATHS[-1]}, {len(os.sched_getaffinity(0))} threads, " in reading.method


def test_small_pages_are_read_without_huge_pages():
    reading = machine.stream_read(0.02, passes=2, pages="small")
    assert reading.rate > 0 and " 0% in huge pages" in reading.method


def test_a_path_the_cpu_lacks_or_that_does_not_exist_is_refused_by_name():
    with pytest.raises(RuntimeError, match="ISA neon is not one of avx512, avx2, scalar"):
        machine.stream_read(0.01, passes=1, isa="neon")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["12", "3"], "BYTES must be at least 4096 per thread"),
        (["-5", "3"], "BYTES must be a positive integer"),
        (["1000000", "0"], "PASSES must be an integer from 1 to 1000"),
        (["1000000", "2", "0"], "THREADS must be an integer from 1 to 1024"),
        ([], "usage: read_bandwidth BYTES PASSES"),
        (["1000000", "2", "1", "auto", "tiny"], "PAGES must be huge or small"),
    ],
)
def test_the_probe_rejects_bad_arguments_in_one_line(arguments, message):
    done = subprocess.run([str(machine.probe_binary()), *arguments], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"read_bandwidth: {message}") and done.stderr.count("\n") == 1


def test_the_probe_is_built_once_into_the_per_user_cache(cache):
    first = machine.probe_binary()
    assert first.is_relative_to(cache / "paddle_glm4" / "probe") and os.access(first, os.X_OK)
    built = first.stat().st_mtime_ns
    assert machine.probe_binary() == first and first.stat().st_mtime_ns == built
    assert [path.name for path in first.parent.iterdir()] == ["read_bandwidth"]  # no half-written leftovers


def test_without_a_compiler_the_probe_says_which_one_to_install(cache, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(machine.ProbeUnavailable, match=r"^no C compiler \(/nonexistent/cc not found\): install gcc$"):
        machine.probe_binary()


def test_without_a_compiler_the_reading_falls_back_to_torch_and_says_why(cache, monkeypatch, capsys):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    reading = machine.read(0.01, passes=2)
    assert reading.rate > 0 and reading.method == "torch's sum (no C compiler (/nonexistent/cc not found): install gcc)"
    assert "falling back to torch's sum" in capsys.readouterr().err
    assert not (cache / "paddle_glm4" / "probe").exists()


def test_a_compiler_that_fails_is_reported_with_its_error_and_leaves_nothing(cache, monkeypatch, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text(
        "#!/bin/sh\necho 'read_bandwidth.c:1: warning: nothing' >&2\necho 'fatal error: boom' >&2\nexit 1\n"
    )
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with pytest.raises(
        machine.ProbeUnavailable, match=r"broken-cc failed to compile read_bandwidth.c: fatal error: boom$"
    ):
        machine.probe_binary()
    assert [path for path in (cache / "paddle_glm4" / "probe").rglob("*") if path.is_file()] == []


def test_the_machine_figures_name_how_the_bandwidth_was_read():
    measured = machine.measure(quick=True)
    assert measured["read_bandwidth_gbps"] > 0 and measured["fp32_matmul_gflops"] > 0
    assert measured["read_bandwidth_method"].startswith("C streaming read (")


# ---- the low-bit benchmark's bound ----------------------------------------------------------------------------
def _engine(before: float, after: float, decode: float = 10.0, per_token: float = 2e9, between=()) -> dict:
    """An engine's result; `between`: readings taken between its consecutive decode runs."""
    runs = max(len(between) - 1, 1)
    return {
        "bandwidth_before": before,
        "bandwidth_after": after,
        "bandwidth_around": [list(pair) for pair in itertools.pairwise(between)],
        "decode": decode,
        "decode_runs": [decode] * runs,
        "bytes_per_token": per_token,
    }


def test_the_bound_is_the_higher_reading_so_that_a_drop_during_the_run_cannot_flatter_the_engine():
    assert lowbit.bound(_engine(30e9, 40e9)) == 20.0
    assert lowbit.bound(_engine(40e9, 30e9)) == 20.0


def test_with_readings_between_the_runs_each_run_is_bounded_by_its_own_and_the_engine_by_their_median():
    # runs bounded by 40, 40 and 60 GB/s: the median 40; the readings before and after the engine do not count
    engine = _engine(90e9, 90e9, between=[30e9, 40e9, 36e9, 60e9])
    assert lowbit.bound(engine) == 20.0


def test_an_engine_whose_bandwidth_moved_is_named_and_a_steady_one_is_not():
    notes = lowbit.drifted(
        {
            "int4": _engine(30e9, 40e9),
            "Q4_0": _engine(30e9, 33e9),
            "bf16": _engine(34e9, 34e9, between=[34e9, 58e9, 34e9]),
            "int8": _engine(20e9, 60e9, between=[34e9, 35e9, 36e9]),
        }
    )
    assert notes == [
        "int4: the read bandwidth moved while it ran (30.0, 40.0 GB/s around its decode runs): its "
        "decode-vs-bound fraction is suspect",
        "bf16: the read bandwidth moved while it ran (34.0, 58.0, 34.0 GB/s around its decode runs): its "
        "decode-vs-bound fraction is suspect",
    ]


def test_the_rows_measure_both_engines_against_their_own_bound():
    config = lowbit.lowbit_config(True, 2)
    mine = {
        **_engine(30e9, 36e9, decode=12.0, per_token=3e9),
        "prefill": 100.0,
        "peak_rss": 2e9,
        "weight_bytes": 3e9,
        "kernel": "avx2",
        "load_before": 0.5,
    }
    theirs = {**_engine(33e9, 32e9, decode=10.0, per_token=3.3e9), "prefill": 90.0, "peak_rss": 1.5e9}
    theirs.update(load_before=0.4, build="abc")
    rows = lowbit._rows({"int4": mine, "Q4_0": theirs}, config, True, "avx2", (lowbit.FORMATS[2],))
    bounds = {row["figure"]: row for row in rows if "bandwidth bound" in row["figure"]}
    ours = next(row for figure, row in bounds.items() if "(ours int4, " in figure)
    peer = next(row for figure, row in bounds.items() if "(llama.cpp Q4_0, " in figure)
    assert ours["peer"] == pytest.approx(12.0) and ours["ratio"] == pytest.approx(1.0)  # 36 GB/s / 3 GB
    assert peer["peer"] == pytest.approx(10.0) and peer["ratio"] == pytest.approx(1.0)  # 33 GB/s / 3.3 GB
    assert ours["details"]["read_bandwidth_gbps_around_decode_runs"] == pytest.approx([30.0, 36.0])
    assert ours["details"]["peer_read_bandwidth_gbps_after"] == pytest.approx(32.0)


@pytest.fixture
def fake_llama_bench(tmp_path):
    """A stand-in for llama-bench that prints one test's JSON, as the real one does with -o json."""
    script = tmp_path / "llama-bench"
    script.write_text(
        '#!/bin/sh\necho \'[{"n_prompt": 0, "samples_ts": [7.5], "build_commit": "fake", "cpu_info": "cpu"}]\'\n'
    )
    script.chmod(0o755)
    return str(script)


def test_the_peer_reads_the_bandwidth_around_each_decode_run_and_its_peak_rss_is_llama_benchs_own(fake_llama_bench):
    """In its own small process, as the benchmark runs it: the probe's 300 MB buffer is not llama-bench's."""
    result = run_python_json(
        ["-m", "benchmarks.lowbit", "peer", fake_llama_bench, "model.gguf", "--probe-gigabytes", "0.3"], timeout=120
    )
    assert result["decode_runs"] == [7.5] * 5 and result["decode"] == 7.5 and result["prefill"] == 7.5
    around = result["bandwidth_around"]
    assert len(around) == 5 and min(min(pair) for pair in around) > 0
    assert [pair[0] for pair in around[1:]] == [pair[1] for pair in around[:-1]]  # one reading between two runs
    assert 0 < result["peak_rss"] < 200e6  # the small parent's memory at fork counts, the probe's does not


def test_the_peer_prefill_only_runs_no_decode(fake_llama_bench):
    result = lowbit.peer(fake_llama_bench, "model.gguf", quick=True, layers=2, decode=False)
    assert result["prefill"] == 7.5 and "decode" not in result and "decode_runs" not in result


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from benchmarks.full_depth import write_random_checkpoint

    directory = tmp_path_factory.mktemp("lowbit_tiny")
    write_random_checkpoint(str(directory), lowbit.lowbit_config(True, 2))
    return str(directory)


def test_the_peers_decode_runs_alternate_with_ours_between_the_same_readings(tiny_checkpoint, fake_llama_bench):
    """With --peer-decode, our process runs llama-bench's decode runs between its own: each reading between two
    runs is the one after the first and the one before the second."""
    peer = ["--peer-decode", fake_llama_bench, "model.gguf", "--probe-gigabytes", "0.1"]
    ours = ["-m", "benchmarks.lowbit", "ours", tiny_checkpoint, "int4", "--quick"]
    result = run_python_json([*ours, *peer], timeout=300)
    peer = result["peer"]
    assert peer["decode_runs"] == [7.5] and peer["decode"] == 7.5
    assert len(result["decode_runs"]) == 1 and result["decode"] > 0
    (mine,), (theirs,) = result["bandwidth_around"], peer["bandwidth_around"]
    assert mine[1] == theirs[0] and min(mine + theirs) > 0  # ours, a reading, then the peer's run


def test_the_peer_takes_its_alternated_decode_runs_and_the_readings_around_them():
    mine = {**_engine(30e9, 36e9), "peer": {"decode": 8.0, "decode_runs": [8.0], "bandwidth_around": [[1, 2]]}}
    prefill = {"prefill": 90.0, "peak_rss": 2e9, "build": "abc", "bandwidth_before": 20e9, "bandwidth_after": 21e9}
    theirs = lowbit.merge_alternated(mine, prefill)
    assert "peer" not in mine
    assert theirs["decode"] == 8.0 and theirs["prefill"] == 90.0 and theirs["peak_rss"] == 2e9
    assert theirs["bandwidth_around"] == [[1, 2]] and theirs["build"] == "abc"
    assert (theirs["bandwidth_before"], theirs["bandwidth_after"]) == (30e9, 36e9)  # ours: around its runs


def test_an_engines_rounds_are_pooled_run_by_run():
    first = {**_engine(30e9, 31e9, decode=2.0), "decode_runs": [1.0, 2.0, 3.0], "prefill": 10.0, "peak_rss": 5}
    second = {**_engine(50e9, 52e9, decode=5.0), "decode_runs": [4.0, 5.0, 6.0], "prefill": 14.0, "peak_rss": 7}
    both = lowbit.pooled([first, second])
    assert both["decode_runs"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and both["decode"] == 3.5
    assert both["prefill"] == 12.0 and both["peak_rss"] == 7
    assert both["bandwidth_around"] == [[30e9, 31e9], [50e9, 52e9]]  # each process's, before and after
    assert (both["bandwidth_before"], both["bandwidth_after"]) == (30e9, 52e9)
    assert lowbit.bound(both) == pytest.approx((31e9 + 52e9) / 2 / 2e9)  # the median of the two higher readings
    assert lowbit.pooled([first]) is first


def test_two_models_alternate_only_where_both_fit_in_memory(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    with open(gguf, "wb") as f:
        f.truncate(10 << 30)  # sparse: the size is what counts
    monkeypatch.setattr(machine, "memory_bytes", lambda: 24 << 30)
    assert lowbit.side_by_side(str(gguf))  # GLM-4-9B in Q8_0 at 40 layers: 10 GB twice, and room
    monkeypatch.setattr(machine, "memory_bytes", lambda: 20 << 30)
    assert not lowbit.side_by_side(str(gguf))


def test_the_peer_without_probe_takes_no_reading(fake_llama_bench):
    assert lowbit.peer(fake_llama_bench, "model.gguf", quick=True, layers=2)["bandwidth_around"] == []


def test_a_failing_llama_bench_is_reported_with_its_error(tmp_path):
    script = tmp_path / "llama-bench"
    script.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"^llama-bench failed \(3\): error: failed to load model$"):
        lowbit.peer(str(script), "model.gguf", quick=True, layers=2)


def test_buffers_read_for_the_memory_rate_outgrow_the_largest_cache(tmp_path):
    for index, size in enumerate(["48K", "2048K", "260M", "junk"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    (tmp_path / "index9").mkdir()  # no size file: skipped
    assert machine.last_level_cache_bytes(tmp_path) == 260 << 20
    assert machine.last_level_cache_bytes(tmp_path / "absent") == 32 << 20
    largest = machine.last_level_cache_bytes()
    assert machine.beyond_caches(0.001) == pytest.approx(4 * largest / 1e9)
    assert machine.beyond_caches(1000.0) == 1000.0
