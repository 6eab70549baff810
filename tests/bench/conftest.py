"""Fixtures of the speed benches' tests. The scripts import their siblings by name (`import benchlib`), as
`python bench/x.py` lets them: pyproject's pytest `pythonpath` puts bench/ (and this folder, for
bench_helpers) on the path."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def quick_args(tmp_path: Path, tiny_bundle_dir: Path) -> list[str]:
    """The flags of a quick run of any of the benches on the tiny bundle, its result under tmp_path/results."""
    return ["--quick", "--allow-busy", "--idle-wait", "0", "--model-dir", str(tiny_bundle_dir), "--device", "cpu",
            "--output-dir", str(tmp_path / "results")]
