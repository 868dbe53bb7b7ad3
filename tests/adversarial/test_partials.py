"""Stale partial output: a run ended by a signal leaves nothing; a run that could not clean up (SIGKILL, a power
cut) leaves a `.partial` directory that the next run into the same parent removes once it can prove that the
process that made it is gone; what it cannot prove is its own, it reports and keeps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corpus import build_published, build_templates, copy_tree
from sandbox import one_error_line, outside, snapshot

from checkpoint_builders import big_checkpoint
from converters import torch_to_paddle
from paddle_glm4.output_dir import OWNER_FILE, _this_process

pytestmark = pytest.mark.torch_free
ROOT = Path(__file__).resolve().parents[2]


def start(*argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_partial(process: subprocess.Popen, parent: Path, holding: str) -> Path:
    """The partial directory in `parent`, once it holds a file matching `holding` (the run is mid-way)."""
    deadline = time.monotonic() + 180
    while True:
        found = [p for p in parent.glob(".*.partial") if any(p.glob(holding))] if parent.exists() else []
        if found:
            return found[0]
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return build_templates(tmp_path_factory)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    return big_checkpoint(tmp_path_factory.mktemp("big") / "src", megabytes=200)


@pytest.mark.slow  # a converter or an export in a subprocess
@pytest.mark.parametrize("command", [["converters.torch_to_paddle"], ["paddle_glm4", "convert"]], ids=" ".join)
def test_a_hangup_cleans_up_like_ctrl_c(tmp_path, big, command):
    """SIGHUP (the terminal closed, ssh dropped) ends the converter like SIGTERM: nothing left behind."""
    before = snapshot(big)
    process = start("-m", *command, "--src", str(big), "--dst", str(tmp_path / "out" / "dst"))
    wait_for_partial(process, tmp_path / "out", "*.safetensors")
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err, err
    assert not (tmp_path / "out").exists()  # not even the parent it created
    assert snapshot(big) == before


@pytest.mark.slow  # a converter or an export in a subprocess
def test_a_hangup_ends_an_export_without_leftovers(tmp_path, templates):
    paddle = copy_tree(templates[1], tmp_path / "paddle")
    (tmp_path / "exports").mkdir()
    process = start(
        "-m", "paddle_glm4.inference", "export", "--model", str(paddle), "--out", str(tmp_path / "exports" / "e")
    )
    wait_for_partial(process, tmp_path / "exports", OWNER_FILE)
    process.send_signal(signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in err, err
    assert os.listdir(tmp_path / "exports") == []


@pytest.mark.slow  # a converter or an export in a subprocess
def test_what_a_killed_run_leaves_the_next_run_removes(tmp_path, big, capsys):
    parent = tmp_path / "out"
    process = start("-m", "converters.torch_to_paddle", "--src", str(big), "--dst", str(parent / "dst"))
    partial = wait_for_partial(process, parent, "*.safetensors")
    process.kill()  # SIGKILL: no chance to clean up
    process.communicate(timeout=60)
    assert partial.exists()
    (parent / "mine.txt").write_text("a user's file beside it")
    small = tmp_path / "small"
    build_published(small)
    assert torch_to_paddle.main(["--src", str(small), "--dst", str(parent / "other")]) == 0
    assert f"removed {partial}" in capsys.readouterr().err
    assert sorted(os.listdir(parent)) == ["mine.txt", "other"]


def owned_partial(parent: Path, name: str, owner: dict | None) -> Path:
    path = parent / name
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * 1000)
    if owner is not None:
        (path / OWNER_FILE).write_text(json.dumps(owner))
    return path


def test_a_clean_run_reports_no_partial_of_its_own(tmp_path, templates, capsys):
    """The last check before the rename looks for stale partials beside the destination: the run's own staging
    directory is not one of them, so a plain conversion prints no note about it."""
    assert torch_to_paddle.main(["--src", str(templates[0]), "--dst", str(tmp_path / "out" / "dst")]) == 0
    assert "looks like unfinished output" not in capsys.readouterr().err
    assert not list((tmp_path / "out").glob(".*.partial"))


@pytest.mark.parametrize(
    "case", ["no owner file", "owner file not JSON", "a live process", "another machine", "no start time"]
)
def test_partials_not_provably_stale_are_kept(tmp_path, templates, capsys, case):
    parent = tmp_path / "out"
    me = _this_process()
    owners = {
        "no owner file": None,
        "owner file not JSON": None,
        "a live process": me,
        "another machine": {**me, "host": socket.gethostname() + "-elsewhere", "pid": 1},
        "no start time": {**me, "started": None, "pid": 1},
    }
    partial = owned_partial(parent, ".dst.x1.partial", owners[case])
    if case == "owner file not JSON":
        (partial / OWNER_FILE).write_text("{")
    before = snapshot(tmp_path)
    assert torch_to_paddle.main(["--src", str(templates[0]), "--dst", str(parent / "dst")]) == 0
    err = capsys.readouterr().err
    assert outside(snapshot(tmp_path), "out/dst") == before  # the partial kept, byte for byte
    assert (f"{partial} looks like unfinished output" in err) == case.startswith(("no owner", "owner file"))


@pytest.mark.slow  # a converter or an export in a subprocess
def test_a_run_killed_while_swapping_gets_its_old_output_back(tmp_path, templates, capsys):
    """Killed between moving the old output aside and renaming the new one in: the old one comes back."""
    parent = tmp_path / "out"
    old = copy_tree(templates[1], parent / "dst")
    before = snapshot(old)
    code = (
        "import os, sys; from paddle_glm4.output_dir import _partial_directory, REPLACED; "
        "aside = _partial_directory(sys.argv[1], replaces=True); "
        "os.rename(sys.argv[1], os.path.join(aside, REPLACED)); os._exit(9)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(old)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 9 and not old.exists()
    # the next run into the same parent: the old output is put back before anything else, and so refused
    # without --overwrite, like any existing output
    assert torch_to_paddle.main(["--src", str(templates[0]), "--dst", str(old)]) == 2
    err = capsys.readouterr().err
    assert f"restored {old}" in err and "already exists" in one_error_line(err)
    assert snapshot(old) == before
    assert os.listdir(parent) == ["dst"]
