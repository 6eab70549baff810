"""glibc's allocator, told to keep freed memory for reuse in a process that runs the model.

By default glibc serves an allocation above its mmap threshold (128 KiB at the start) with fresh pages from
the kernel and returns them when it is freed, and raises that threshold only after it has freed such a block:
each forward pass's activations (megabytes a layer at batch 64) were mapped, faulted in page by page and unmapped
again, call after call. A fixed threshold of 32 MiB (glibc's own ceiling for its adaptive one) and a trim
threshold of 64 MiB keep them in the heap, reused: at batch 64 on two cores (2026-12-05) the eager network ran
about 10% faster (`docs/performance.md#blas-threads-and-the-allocator`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MADV_DONTNEED = 4  # Linux's mman.h
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def reuse_freed_memory(libc: ctypes.CDLL | None = None) -> bool:
    """Set glibc's mmap and trim thresholds (`mallopt`) for this process; False where the C library is not glibc
    (nothing changes there)."""
    if libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name or "libc.so.6")
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their own allocator
        return False
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        logger.warning("glibc refused the allocator's thresholds; forward passes map their activations afresh")
    return done


def release_pages(address: int, length: int) -> int:
    """Give back to the kernel the whole pages within `length` bytes from `address`, memory this process still
    holds but never reads again (what `madvise(MADV_DONTNEED)` does for `malloc_trim`): they read as zeros
    afterwards. Returns the bytes released; 0 where `madvise` is not there or refuses."""
    page = mmap.PAGESIZE
    first, end = -(-address // page) * page, (address + length) // page * page
    if end <= first:
        return 0
    madvise = getattr(ctypes.CDLL(None, use_errno=True), "madvise", None)
    if madvise is None:
        return 0
    madvise.restype, madvise.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if madvise(first, end - first, MADV_DONTNEED) != 0:
        logger.debug("madvise refused to release %d bytes: %s", end - first, os.strerror(ctypes.get_errno()))
        return 0
    return end - first
