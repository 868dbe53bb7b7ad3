"""What every adversarial test checks after the attack: the exit code and message, and that nothing it was not
allowed to touch changed. `snapshot` records a directory tree without following links: each entry's kind, mode
and content (file bytes' sha256, a link's target), so that a changed byte, a widened mode, a new file or a
replaced link all show."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
from pathlib import Path

import pytest


def snapshot(root) -> dict[str, tuple]:
    """{path relative to `root`: (kind, mode, content)} of everything under `root` (not following links)."""
    root = Path(root)
    tree = {}
    if not os.path.lexists(root):
        return tree
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                content = None  # a directory (its entries are listed themselves), a FIFO, ...
            tree[os.path.relpath(path, root)] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), content)
    return tree


def outside(tree: dict[str, tuple], target: str | None) -> dict[str, tuple]:
    """The part of a snapshot outside `target` (a path relative to the snapshot's root)."""
    if target is None:
        return tree
    return {path: entry for path, entry in tree.items() if path != target and not path.startswith(target + os.sep)}


def one_error_line(stderr: str) -> str:
    """The single `error:` line a failing command prints (notes may come before it), checked to be alone."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def refused(capsys, main, argv, sandbox, *messages) -> str:
    """Run a command line that must refuse: exit 2, one error line holding `messages`, nothing in `sandbox`
    changed (no byte, no mode, no new file: the destinations did not exist before)."""
    before = snapshot(sandbox)
    code = main(argv)
    err = one_error_line(capsys.readouterr().err)
    assert code == 2, err
    for message in messages:
        assert message in err, err
    assert snapshot(sandbox) == before
    return err


@pytest.fixture(autouse=True)
def no_hang():
    """A test that would block (reading a FIFO) fails after a minute instead of hanging the suite. (Autouse in a
    test module that imports it.)"""

    def hung(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
