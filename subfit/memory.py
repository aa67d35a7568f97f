"""Keeping a long compress's resident memory close to what it holds.

A walk allocates and frees thousands of tensors of a few MB (one batch's stream, its
activations, a unit's statistics). glibc serves blocks under its mmap threshold, which it raises
up to 32 MB as large blocks are freed, from its heap, and keeps the heap's free holes mapped: over
the dozens of walks of a multi-level compress the resident memory grows by the holes, not by what
compress holds (`tests/test_compress_memory.py` pins the threshold for that reason).
`release_freed_memory` hands the free pages back between walks.
"""
from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None on another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the allocator's free heap pages to the operating system (glibc `malloc_trim(0)`, which
    also releases whole free pages inside the heap); a no-op where there is no such call. Costs a
    few milliseconds: called once per walk, not per batch."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
