"""Process-level settings for latency-critical scoring processes."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Keep freed blocks below ``threshold_bytes`` in the heap instead of returning them
    to the OS. By default glibc mmaps every block over a few MB and unmaps it on free,
    so each scoring call's multi-MB temporaries page-fault afresh: the full FwFM over
    10,000 items (19 MB of field vectors) measured 57 ms per auction with the default
    and 21 ms with this. Returns False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes))


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach. A full
    collection of a loaded scorer replica (Ray, torch, the bundle) took 120–140 ms, a
    stall of every auction in flight, and recurs as caches fill; frozen, the collector
    walks only what came after. Call it after a (re)load: objects frozen before are
    unfrozen and collected first, so a replaced model is freed (one pause per load)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
