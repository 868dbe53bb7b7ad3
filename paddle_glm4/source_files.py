"""Files a user hands us (a downloaded checkpoint, a tokenizer): the rules for reading and copying them.

A checkpoint directory comes from the internet, and so do the file names written inside its files (an index's
`weight_map`, a manifest's file list). Three rules, applied wherever such a file is opened:
- a file name read from a file is a plain name in its directory: never a path, never `..`;
- a file of the directory may be a link only if it stays inside the directory (or, for a Hugging Face cache
  snapshot, inside that repository's `blobs/`, which is how huggingface_hub stores downloads); a link leaving it
  could make us read, hash and copy any file on the machine;
- only regular files are read: a FIFO would block forever, `/dev/zero` would never end.
Copies never widen access: a copied file keeps at most its source's permission bits.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from typing import IO, Any

FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}
MAX_NAME_BYTES = 255  # longest file name on Linux filesystems


class UnsafeFileError(ValueError):
    """A file name or file that would make us read or write outside the directory it belongs to."""


def plain_name(name: object, where: str) -> str:
    """`name`, checked to be a file name within one directory: a non-empty string without a path separator,
    not `.` or `..`. `where` says where the name was read (file and field), for the message."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(c in name for c in "/\\\0")
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
    ):
        raise UnsafeFileError(
            f"{where}: {name!r} is not a plain file name in this directory (no paths, no '..'); refusing it"
        )
    return name


def source_path(directory: str, name: str, where: str | None = None) -> str:
    """The path of file `name` (read from `where`, when it comes from a file) inside `directory`, checked with
    `check_source_file`."""
    if where is not None:
        plain_name(name, where)
    path = os.path.join(directory, name)
    check_source_file(path, directory)
    return path


def check_source_file(path: str, directory: str | None = None) -> None:
    """Refuse `path` unless it is a regular file whose links (if any) stay inside `directory` (default: the
    directory holding it). A missing file raises FileNotFoundError."""
    directory = os.path.dirname(os.path.abspath(path)) if directory is None else directory
    real = os.path.realpath(path)
    if not any(_inside(real, root) for root in _allowed_roots(directory)):
        raise UnsafeFileError(
            f"{path}: is a link to {real}, outside {directory}; links that leave the directory are not followed"
        )
    _check_regular(path, os.stat(real).st_mode)


def open_source(path: str, directory: str | None = None, mode: str = "rb", encoding: str | None = None) -> IO[Any]:
    """`open(path, mode)` for reading a file of a source directory, after `check_source_file`. The file is opened
    without blocking and checked again once open, so that a FIFO swapped in meanwhile cannot hang us."""
    check_source_file(path, directory)
    fd = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, encoding=encoding)
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str) -> io.BufferedReader:
    """`open(path, "rb")` for a file that must be regular (no link policy): for readers that do not know the
    directory a file belongs to, so that a FIFO or device fails at once instead of blocking or never ending."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def copy_source(path: str, target: str, directory: str | None = None) -> None:
    """Copy the source file `path` to the new file `target`, which gets no permission its source lacks."""
    with open_source(path, directory) as src:
        mode = stat.S_IMODE(os.fstat(src.fileno()).st_mode) & 0o666
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)  # umask narrows it more
        with os.fdopen(fd, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)


def permission_bits(paths: Iterable[str]) -> int:
    """The permission bits all of `paths` share: what a file made from them may grant at most."""
    bits = 0o777
    for path in paths:
        bits &= stat.S_IMODE(os.stat(path).st_mode)
    return bits


def _check_regular(path: str, mode: int):
    if not stat.S_ISREG(mode):
        kind = FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise UnsafeFileError(f"{path}: is {kind}, not a regular file; refusing to read it")


def _allowed_roots(directory: str) -> list[str]:
    """Where links in `directory` may point: inside it, and for a snapshot of a Hugging Face cache
    (`.../models--ORG--NAME/snapshots/REVISION`), inside that repository's `blobs/`."""
    root = os.path.realpath(directory)
    roots = [root]
    snapshots = os.path.dirname(root)
    if os.path.basename(snapshots) == "snapshots":
        roots.append(os.path.join(os.path.dirname(snapshots), "blobs"))
    return roots


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root
