"""A long compress's memory: fast to reuse, and close to what it holds.

A walk allocates and frees thousands of tensors of a few MB (one batch's stream, its
activations, a unit's statistics; a probe's logits are 50 MB). Left to itself, glibc maps every
block over its mmap threshold (raised as large blocks are freed, to 32 MB at most) on its own
and hands the top of its heap back as soon as it is freed, so each new tensor's pages are
faulted in again: a one-draw quick start took 18-19 million page faults, 2.9 million with freed
blocks kept, and 4-14% less time (bench/results/compress_profile.md). `heap_kept_during_compress`
keeps freed blocks mapped for reuse while compress runs; `release_freed_memory` hands the free
pages back once per walk and probe, so the resident memory follows what compress holds, not the
holes it freed.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
HEAP_BLOCKS_UP_TO = 256 * 2**20  # during compress, blocks up to this size come from the heap
# Where glibc's own adjustment of the two thresholds stops on 64-bit systems: what compress leaves
# them at (setting either switches the adjustment off for the process).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc (it has `malloc_trim` and `mallopt`), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if all(hasattr(libc, name) for name in ("malloc_trim", "mallopt")) else None


def release_freed_memory() -> None:
    """Return the allocator's free heap pages to the operating system (glibc `malloc_trim(0)`, which
    also releases whole free pages inside the heap); a no-op where there is no such call. Costs a
    few milliseconds: called once per walk, not per batch."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def heap_kept_during_compress() -> Iterator[bool]:
    """Serve blocks up to `HEAP_BLOCKS_UP_TO` from glibc's heap and keep freed ones mapped until
    `release_freed_memory`, for the duration; yields whether it did. Left alone where the C library
    is not glibc or the user set glibc's allocator through its environment variables. On exit the
    thresholds stay at the values glibc's own adjustment converges to, and the free pages go back."""
    libc = _glibc()
    if libc is None or any(name in os.environ for name in USER_SETTINGS):
        yield False
        return
    libc.mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS_UP_TO)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never on free: release_freed_memory trims
    try:
        yield True
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_THRESHOLD_MAX)
        release_freed_memory()
