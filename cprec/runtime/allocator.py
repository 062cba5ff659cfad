"""glibc malloc settings that keep XLA's per-step buffers from being returned to the OS.

XLA on CPU allocates its large temporaries afresh every step. With glibc's
defaults, big blocks are mmap'ed and freed back (or the heap top trimmed), so
every step pays page faults on new memory, a large share of a CPU step (docs/benchmarks.md,
"NextItNet training throughput"). Keeping freed memory in the heap removes that cost.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Disables mmap for large blocks and heap trimming (glibc only); returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave the defaults
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    return bool(ok)
