"""Freed memory kept for reuse: glibc's malloc tuned for sample-sized arrays.

An ADMM block update allocates a dozen arrays of ``d x n`` values (its temporaries and its
results) and frees as many. glibc hands every allocation above its mmap threshold out as a
fresh mapping, whose pages fault in and are zero-filled on first touch, and gives it back to the
system when it is freed. The threshold adapts to freed sizes only up to 32 MiB, so from about
width 512 with 8,192 samples on (``512 x 8192`` float64 is 33.5 MB) every such array is new
memory every time: a RADMM-3 iteration at that size spent about a fifth of its time in the
kernel's page-fault path (measured: 2.85 s against 3.3-3.9 s per iteration with relu).

:func:`reuse_freed_memory` raises glibc's mmap and trim thresholds to :data:`THRESHOLD` (1 GiB)
and keeps one allocation arena (worker threads would otherwise get arenas of at most 64 MiB,
which cannot hold such an array): a freed array's memory then stays in the process's heap and
serves the next one without faulting. The price is that freed memory is kept while the process
runs; :func:`give_back` returns what is free to the system (``malloc_trim``). The LocalCluster's
workers get the same setting from :func:`worker_environ`, read by glibc when they start.

``cluster.reuse_memory`` (default on) switches this for a run: :func:`daskadmm.api.fit` (and
so the command line and the estimators) sets it in its own process for the run and gives the
free memory back at the end; a LocalCluster daskadmm starts gets it for its workers, except with
an explicit ``cluster.memory_limit`` (out-of-core runs keep distributed's setting, which gives
freed memory back at once). On a system without glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

__all__ = ["THRESHOLD", "give_back", "reuse_freed_memory", "worker_environ"]

THRESHOLD = 1 << 30  # bytes: allocations below it come from the heap, freed memory stays

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@functools.cache
def _libc():
    """glibc, or None (another C library: its malloc is left alone)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def reuse_freed_memory() -> bool:
    """Keep freed memory of this process in its heap for reuse (see the module docstring).
    Returns whether glibc accepted the setting (False elsewhere: nothing changed). It lasts
    for the life of the process."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD))
    ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD)) and ok
    return bool(libc.mallopt(_M_ARENA_MAX, 1)) and ok


def give_back() -> None:
    """Return this process's free heap memory to the system (glibc ``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def worker_environ() -> dict[str, str]:
    """The environment variables that give a new process :func:`reuse_freed_memory`'s
    setting from its start (glibc reads them at its first allocation)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(THRESHOLD),
            "MALLOC_ARENA_MAX": "1"}
