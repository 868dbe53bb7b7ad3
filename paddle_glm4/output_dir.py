"""Directories the project writes (converted checkpoints, exports): built aside, put in place whole, and only ever
replacing a directory the project itself wrote.

- `check_destination` runs before any work: an existing destination is replaced only with `overwrite`, and only if
  it is empty or recognisably ours: it holds our manifest, and nothing that manifest does not list. Anything else
  (a user's folder that happens to hold a config.json, a link, a file) is refused, with or without `overwrite`.
- `staged` builds the output in a hidden `.NAME.XXXX.partial` directory beside the destination and renames it into
  place once complete; an error or interrupt removes it. While it exists it holds an owner file naming the process
  that builds it, so that what a killed run (SIGKILL, a power cut) leaves behind can be told apart later:
- `remove_stale_partials` (called by `check_destination`) removes the partial directories in the parent whose builder is
  provably gone (same machine, same boot, no such process any more), and reports those it cannot prove are ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .validation import read_json

PARTIAL_SUFFIX = ".partial"
OWNER_FILE = ".paddle_glm4-owner.json"  # inside a partial directory, while it is being built
REPLACED = "replaced"  # inside a partial directory: the destination being swapped out


class DestinationError(ValueError):
    """A destination that cannot be written without losing data."""


@dataclass(frozen=True)
class OutputKind:
    """What the project writes into one kind of directory: `what` names it for messages; `manifest` is the file
    that marks it ours; `listed(manifest's JSON)` gives every file the directory may hold (None: not ours)."""

    what: str
    manifest: str
    listed: Callable[[object], Iterable[str] | None]


def check_destination(dst: str, overwrite: bool, kind: OutputKind, flag: str = "--dst") -> None:
    """Refuse a destination whose replacement would lose data (see the module docstring). First, tidy up after
    killed runs into the same parent (`remove_stale_partials`), which may put back a destination they had moved."""
    remove_stale_partials(os.path.dirname(os.path.abspath(dst)))
    if not os.path.lexists(dst):
        return
    if not overwrite:
        raise DestinationError(f"{flag} {dst} already exists; pass --overwrite to replace it")
    if os.path.islink(dst) or not os.path.isdir(dst):
        raise DestinationError(f"{flag} {dst} exists and is not a directory; not replacing it")
    entries = sorted(os.listdir(dst))
    if not entries:
        return
    manifest = os.path.join(dst, kind.manifest)
    listed = _listed(manifest, kind) if kind.manifest in entries else None
    if listed is None:
        raise DestinationError(
            f"{flag} {dst} does not look like {kind.what} written by paddle_glm4 (no valid "
            f"{kind.manifest}); not replacing it, even with --overwrite"
        )
    foreign = [name for name in entries if name not in listed and name != kind.manifest]
    if foreign:
        raise DestinationError(
            f"{flag} {dst} holds {foreign[0]!r}, which its {kind.manifest} does not list; not "
            "replacing a directory with files paddle_glm4 did not write, even with --overwrite"
        )
    with os.scandir(dst) as scan:
        for entry in scan:
            if not entry.is_file(follow_symlinks=False):
                raise DestinationError(
                    f"{flag} {dst} holds {entry.name!r}, which is not a regular file; "
                    "not replacing it, even with --overwrite"
                )


def _listed(path: str, kind: OutputKind) -> set[str] | None:
    try:
        names = kind.listed(read_json(path))
        return None if names is None else {name for name in names if isinstance(name, str)}
    except (OSError, ValueError, TypeError, AttributeError):
        return None


@contextlib.contextmanager
def staged(dst: str, overwrite: bool, kind: OutputKind, flag: str = "--dst", mode_limit: int = 0o777) -> Iterator[str]:
    """Yield a new empty directory beside `dst` to build the output in; on success, put it in place as `dst`
    (replacing the old one, checked again, when `overwrite`), with its files synced to disk first. Nothing is
    left behind on error or interrupt: neither the directory nor the parents this created. The output gets
    no permission bit outside `mode_limit` (its sources' bits, so that converting never widens access)."""
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    created, staging = _make_directories(parent), None
    try:
        staging = _partial_directory(dst)
        yield staging
        # again: the destination may have changed meanwhile (while the owner file still marks the staging
        # directory as this live run's, so that the check's look for stale partials passes over it)
        check_destination(dst, overwrite, kind, flag)
        os.unlink(os.path.join(staging, OWNER_FILE))
        _limit_modes(staging, mode_limit)
        _sync_directory(staging)
        _publish(staging, dst)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(created):
            with contextlib.suppress(OSError):  # someone else put something there meanwhile: keep it
                os.rmdir(directory)
        raise


def _partial_directory(dst: str, replaces: bool = False) -> str:
    """A new `.NAME.XXXX.partial` directory beside `dst`, holding its owner file."""
    path = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.", suffix=PARTIAL_SUFFIX, dir=os.path.dirname(dst))
    try:
        owner = {**_this_process(), "destination": os.path.basename(dst), "replaces": replaces}
        with open(os.path.join(path, OWNER_FILE), "w", encoding="utf-8") as f:
            json.dump(owner, f)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _publish(staging: str, dst: str):
    """Rename the finished directory to `dst`. An existing `dst` is first moved into a partial directory of its
    own (so that a run killed right there leaves it recoverable: see remove_stale_partials), and removed after."""
    if os.path.lexists(dst):
        aside = _partial_directory(dst, replaces=True)
        os.rename(dst, os.path.join(aside, REPLACED))
        try:
            os.rename(staging, dst)
        except BaseException:
            os.rename(os.path.join(aside, REPLACED), dst)
            shutil.rmtree(aside)
            raise
        shutil.rmtree(aside)
    else:
        os.rename(staging, dst)
    _fsync(os.path.dirname(dst))


def _make_directories(path: str) -> list[str]:
    """mkdir -p, returning the directories it created (outermost first), to remove them on failure."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        os.mkdir(directory)
    return missing[::-1]


def _limit_modes(directory: str, limit: int):
    """Give the directory and its files no permission bit outside `limit` (files are never executable; the
    directory may be entered by whoever may read)."""
    os.chmod(directory, (0o777 & ~_umask()) & (limit | (limit & 0o444) >> 2))
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) & limit & 0o666)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_directory(directory: str):
    """fsync every file, then the directory, so that the rename publishes data that is on disk."""
    for name in os.listdir(directory):
        _fsync(os.path.join(directory, name))
    _fsync(directory)


def _fsync(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- what killed runs leave behind ------------------------------------------------------------------------------
def _this_process() -> dict:
    return {"pid": os.getpid(), "started": _start_time(os.getpid()), "boot": _boot_id(), "host": socket.gethostname()}


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc): with the boot id, tells it apart from a
    later process that reuses its pid. None where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces
    except (OSError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _owner_gone(owner: dict) -> bool:
    """True only when the process that made a partial directory provably no longer runs."""
    me = _this_process()
    if owner.get("host") != me["host"] or me["boot"] is None or owner.get("started") is None:
        return False  # another machine (a shared filesystem) or no /proc: cannot tell
    if owner.get("boot") != me["boot"]:
        return True  # the machine rebooted since: every process of that boot is gone
    pid = owner.get("pid")
    return isinstance(pid, int) and pid > 0 and _start_time(pid) != owner["started"]


def remove_stale_partials(parent: str) -> list[str]:
    """Remove the partial directories in `parent` left by runs that are gone; a destination that such a run was
    swapping out and that is missing is put back first. Those not provably ours are reported on stderr and kept.
    Returns the paths removed."""
    removed: list[str] = []
    try:
        names = sorted(n for n in os.listdir(parent) if n.startswith(".") and n.endswith(PARTIAL_SUFFIX))
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            owner = read_json(os.path.join(path, OWNER_FILE))
            if not isinstance(owner, dict):
                raise ValueError
        except (OSError, ValueError):
            print(
                f"note: {path} looks like unfinished output, but has no readable {OWNER_FILE} to prove that "
                "paddle_glm4 made it; left alone (remove it yourself if it is)",
                file=sys.stderr,
            )
            continue
        if not _owner_gone(owner):
            continue  # a run still going on, or one we cannot judge from here
        replaced = os.path.join(path, REPLACED)
        destination = owner.get("destination")
        try:
            if (
                owner.get("replaces") is True
                and os.path.isdir(replaced)
                and isinstance(destination, str)
                and "/" not in destination
                and destination not in ("", ".", "..")
                and not os.path.lexists(os.path.join(parent, destination))
            ):
                os.rename(replaced, os.path.join(parent, destination))  # killed mid-swap: the old output is back
                print(
                    f"note: restored {os.path.join(parent, destination)}, which an interrupted run had moved aside",
                    file=sys.stderr,
                )
            shutil.rmtree(path)
        except OSError as err:  # e.g. a parent we may read but not write: say so, and carry on
            print(
                f"note: could not remove {path}, left by process {owner.get('pid')} which is gone ({err})",
                file=sys.stderr,
            )
            continue
        print(
            f"note: removed {path}, the unfinished output of process {owner.get('pid')}, which is gone", file=sys.stderr
        )
        removed.append(path)
    return removed
