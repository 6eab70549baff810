"""The speed benches' scripts import their siblings by name (`import benchlib`), as `python bench/x.py` lets
them: bench/ goes on the path for these tests, and this folder for their helpers (bench_helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.common.collection import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

@pytest.fixture
def quick_args(tmp_path: Path, tiny_bundle_dir: Path) -> list[str]:
    """The flags of a quick run of any of the benches on the tiny bundle, its result under tmp_path/results."""
    return ["--quick", "--allow-busy", "--idle-wait", "0", "--model-dir", str(tiny_bundle_dir), "--device", "cpu",
            "--output-dir", str(tmp_path / "results")]
