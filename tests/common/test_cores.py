"""The core count the thread defaults follow: the process's CPU affinity, capped by a cgroup CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common import cores
from services.common.cores import available_cores, faiss_threads, idle_openmp_threads_sleep, torch_threads

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
