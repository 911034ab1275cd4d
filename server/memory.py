"""Giving memory back after a large request (glibc malloc; a no-op elsewhere).

A request that parses and plans a 100k-note file allocates a few hundred MB in a worker thread
and frees it. glibc kept most of it: the freed blocks of a thread's arena stay mapped, and its
mmap threshold rises after large frees (so the next large arrays come from the heap too). The
hostile-upload benchmark's RSS grew by a third over the run. Fixed thresholds hand large blocks
back at once, and `trim()` after a burst of requests returns the arenas' free pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.malloc_trim, lib.mallopt  # noqa: B018 - glibc only (not musl)
            _libc = lib
        except (OSError, AttributeError):
            return None
    return _libc


def tune_malloc() -> None:
    """Fixed thresholds (blocks of 1 MiB and more are mmapped and unmapped when freed; free
    heap tops over 8 MiB are trimmed) and at most 4 arenas (each thread that allocates
    otherwise gets one, and keeps its free pages)."""
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 8 << 20)
    libc.mallopt(_M_ARENA_MAX, 4)


def trim() -> None:
    """Return free pages of every arena to the system (a few ms; call it off the loop)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
