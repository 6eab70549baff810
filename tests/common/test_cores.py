"""The core count the thread defaults follow: the process's CPU affinity, capped by a cgroup CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common import cores
from services.common.cores import (
    available_cores,
    faiss_threads,
    idle_openmp_threads_sleep,
    single_threaded_blas,
    torch_threads,
)

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("max 100000\n", AFFINITY),  # no quota
    ("50000 100000\n", 1),  # half a core: one thread
    ("150000 100000\n", min(AFFINITY, 2)),  # a core and a half: rounded up
    ("10000000 100000\n", AFFINITY),  # a quota above the CPUs it may run on
    ("garbage", AFFINITY),
])
def test_available_cores_follow_the_affinity_and_the_quota(tmp_path: Path, cpu_max: str, expected: int) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert available_cores(cpu_max=path) == expected


def test_without_a_cgroup_file_the_affinity_counts(tmp_path: Path) -> None:
    assert available_cores(cpu_max=tmp_path / "absent") == AFFINITY


def test_a_setting_wins_else_the_defaults_follow_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert torch_threads(3) == 3 and faiss_threads(5) == 5
    monkeypatch.setattr(cores, "available_cores", lambda: 16)
    assert torch_threads(None) == 16 and faiss_threads(None) == 4
    monkeypatch.setattr(cores, "available_cores", lambda: 2)
    assert torch_threads(None) == 2 and faiss_threads(None) == 1


def test_a_serving_process_lets_idle_openmp_threads_sleep_unless_told_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    idle_openmp_threads_sleep()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    idle_openmp_threads_sleep()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_blas_runs_on_one_thread_once_asked_and_openmp_keeps_its_count() -> None:
    import faiss  # its BLAS too, once loaded: built on OpenMP
    import numpy as np  # noqa: F401 - OpenBLAS on its own threads
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"), threadpool_limits(limits=2, user_api="openmp"):  # put back
        single_threaded_blas()
        blas = [library for library in threadpool_info() if library["user_api"] == "blas"]
        own_threads = [library for library in blas if library.get("threading_layer") != "openmp"]
        assert own_threads and all(library["num_threads"] == 1 for library in own_threads)
        assert faiss.omp_get_max_threads() == 2  # OpenMP's count is FAISS's setting, not the BLAS's
