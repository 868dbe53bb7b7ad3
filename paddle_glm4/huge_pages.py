"""Loaded weights in 2 MB pages (Linux), because a decode step streams every weight byte once.

In 4 KB pages that stream takes a TLB miss every 4 KB, each a page walk (two-dimensional under a VM) whose
page-table reads miss the cache once the weights outgrow it. benchmarks/read_bandwidth.c on a 2-core EPYC VM
(8 GB buffer, both kinds of pages in one run): 32-33 GB/s in 2 MB pages against 16-30 in 4 KB pages, and
53-54 against 41-47 when the machine's memory ran fast. llama.cpp maps its GGUF file and gets the page
cache's large folios mapped whole (88% of GLM-4-9B's BF16 file at 40 layers).

numpy already advises the kernel to back its large arrays with huge pages (MADV_HUGEPAGE), but the kernel
gives them only where it finds free 2 MB blocks at the moment a page is first written; loading GLM-4-9B
fills the memory with the checkpoint's page cache, and a third of the weights came in 4 KB pages. So after
loading, `settle` asks the kernel to collapse the weights into huge pages (MADV_COLLAPSE, Linux 6.1: a copy,
~0.4 s a GB); where memory is too fragmented for that, it drops the page cache of the checkpoint files the
weights were copied from (they are in the model now; pages someone still maps stay) and asks again: 97% of
GLM-4-9B's weights end in huge pages on a 24 GB machine, against 66% before. Where any of this is missing
(another OS, an older kernel, huge pages disabled) nothing changes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Iterable

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25  # <sys/mman.h>, Linux >= 6.1 (Python's mmap module names it from 3.13 only)

Buffer = tuple[int, int]  # (address, bytes) of an array's memory


def settle(buffers: Iterable[Buffer], sources: Iterable[str] = ()) -> list[Buffer]:
    """Collapse `buffers` (arrays this process owns, in anonymous memory) into huge pages; where the kernel
    cannot, drop the page cache of the files in `sources` and try those buffers once more. Returns the
    buffers still (partly) in small pages."""
    failed = collapse(buffers)
    if failed and sources:
        drop_cache(sources)
        failed = collapse(failed)
    return failed


def collapse(buffers: Iterable[Buffer]) -> list[Buffer]:
    """MADV_COLLAPSE over the whole 2 MB pages inside each buffer (its unaligned edges stay as they are).
    Returns the buffers the kernel lacked the free memory to collapse wholly."""
    madvise = _madvise()
    if madvise is None:
        return []
    failed = []
    for address, nbytes in buffers:
        begin = -(-address // HUGE_PAGE) * HUGE_PAGE
        end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
        # EINVAL: this kernel has no MADV_COLLAPSE, or huge pages are off (dropping caches cannot help);
        # anything else (ENOMEM, EAGAIN) is no free 2 MB block
        if end > begin and madvise(begin, end - begin, MADV_COLLAPSE) != 0 and ctypes.get_errno() != errno.EINVAL:
            failed.append((address, nbytes))
    return failed


def drop_cache(paths: Iterable[str]) -> None:
    """Let the kernel free the page cache of `paths` (POSIX_FADV_DONTNEED: the files are untouched, a later
    read reads the disk again; pages still mapped by anyone stay)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone or unreadable now: nothing of it to drop
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_huge_bytes(address: int) -> int | None:
    """How many bytes of the mapping that holds `address` are resident in huge pages (its AnonHugePages in
    /proc/self/smaps); None where that cannot be read."""
    try:
        with open("/proc/self/smaps", encoding="ascii") as smaps:
            inside = False
            for line in smaps:
                head = line.split(maxsplit=1)[0]
                if not head.endswith(":"):  # a mapping's first line: "begin-end perms offset ..."
                    begin, end = (int(part, 16) for part in head.split("-"))
                    inside = begin <= address < end
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
