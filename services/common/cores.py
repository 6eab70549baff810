"""How many cores this process may use, and the thread counts that follow from it by default.

    available_cores()     the CPUs this process may run on (its affinity), capped by a cgroup CPU quota
    torch_threads(None)   the forward pass's intra-op threads: every available core
    faiss_threads(None)   the embedded FAISS index's OpenMP threads: a quarter of them, at least one
    idle_openmp_threads_sleep()   a serving process's OpenMP threads sleep when idle instead of spinning
    single_threaded_blas()        numpy's and FAISS's BLAS on one thread, beside the forward pass

`os.cpu_count()` is the host's count: in a container limited to two CPUs it may say 64, and 64 threads
on two cores spend their time waiting for each other.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in µs, or "max <period>"


def available_cores(*, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may run on, at most its cgroup's CPU quota (rounded up), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cpu_max)
    return max(1, min(cores, quota) if quota is not None else cores)


def _cgroup_quota(cpu_max: Path) -> int | None:
    try:
        quota, period = cpu_max.read_text().split()[:2]
        return math.ceil(int(quota) / int(period)) if quota != "max" else None
    except (OSError, ValueError):
        return None


def torch_threads(setting: int | None) -> int:
    """`CBIR_TORCH_THREADS`, else every available core: the forward pass is the work that scales with them."""
    return setting or available_cores()


def faiss_threads(setting: int | None) -> int:
    """`CBIR_FAISS_THREADS`, else a quarter of the available cores (at least one): a batch of exact searches
    is short and memory-bound, and runs beside the forward pass, whose threads would otherwise wait for it."""
    return setting or max(1, available_cores() // 4)


def idle_openmp_threads_sleep() -> None:
    """`OMP_WAIT_POLICY=PASSIVE` unless set: call it in a serving process before torch or FAISS loads OpenMP.

    By default an OpenMP thread spins for a while after each parallel region, waiting for the next. In a
    server the next region is often not coming yet: the event loop, the decoders and the store need the
    core, and a spinning thread takes it from them, so a forward pass (whose region waits for its slowest
    thread) stalls too. Measured (docs/performance.md#under-load): more queries a second at 16 and 64 clients.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def single_threaded_blas() -> None:
    """The BLAS libraries loaded so far that run their own threads (numpy's OpenBLAS, OpenCV's) on one thread
    each, for good: call it where the model runs in this process, once numpy and FAISS are loaded.

    After each call OpenBLAS's worker threads spin for a while waiting for the next, and the forward pass
    that follows (an OpenMP region that waits for its slowest thread) shares the cores with them: one
    small projection per batch (`build_vectors`: 64 x 512 by 512 x 64) made `Embedder.embed_batch` 2.4x
    slower than its forward pass alone (412 against 986 images/s at batch 64, two cores, 2026-12-05). The
    products this process computes with BLAS are that small: one thread loses nothing. A BLAS built on
    OpenMP (FAISS's) is left alone: its threads are OpenMP's, which `faiss_threads` counts and
    `OMP_WAIT_POLICY` puts to sleep, and setting its count would set OpenMP's.
    """
    from threadpoolctl import ThreadpoolController

    for library in ThreadpoolController().select(user_api="blas").lib_controllers:
        if getattr(library, "threading_layer", None) != "openmp":
            library.set_num_threads(1)
