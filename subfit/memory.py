"""Keeping a long compress's page faults and resident memory close to what it needs.

A walk allocates and frees thousands of tensors of a few to tens of MB (one batch's stream, its
activations, a unit's statistics, a probe's logits, 50 MB per candidate). glibc maps a block above
its mmap threshold (at most 32 MB) on its own and unmaps it when freed, so the next such block is
faulted in page by page again. Blocks under the threshold it serves from its heap, whose free
holes it keeps mapped: over the dozens of walks of a multi-level compress the resident memory
grows by the holes, not by what compress holds (`tests/test_compress_memory.py` pins the
threshold for that reason).

`heap_for_walks` serves every block from the heap while compress runs, and `release_freed_memory`
hands the heap's free pages back between walks: pages are reused within a walk, returned after it.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator

# glibc's mallopt parameters, and the values it starts with
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


@functools.cache
def _libc(name: str):
    """A glibc function (`malloc_trim`, `mallopt`), or None on another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name, None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the allocator's free heap pages to the operating system (glibc `malloc_trim(0)`, which
    also releases whole free pages inside the heap); a no-op where there is no such call. Costs a
    few milliseconds: called once per walk, not per batch."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


@contextlib.contextmanager
def heap_for_walks() -> Iterator[None]:
    """Within the block, glibc serves every block from its heap and keeps freed memory for reuse
    (no mmap, no trimming on free); `release_freed_memory` between walks returns what is free.
    The quick start's probes take 55 s instead of 78, its peak is 2.16 GB instead of 2.09
    (bench/results/compress_profile.md). Afterwards glibc's default limits are set again (its
    mmap threshold no longer adapts) and the free heap pages are returned. An allocator set up
    through the environment (MALLOC_* variables, e.g. MALLOC_MMAP_THRESHOLD_) is left as it is."""
    mallopt = _libc("mallopt")
    if mallopt is None or any(name.startswith("MALLOC_") for name in os.environ):
        yield
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        release_freed_memory()
