"""The import rules of pyproject.toml's `[tool.importlinter]` hold: `lint-imports`, as a test, so that CI runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from services.common.collection import REPO_ROOT


def lint_imports() -> str:
    """The path of `lint-imports` in this environment (pip installs it with the test extra)."""
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert found, "lint-imports is missing: pip install -e '.[test]' installs import-linter"
    return found


def test_the_import_contracts_are_kept() -> None:
    result = subprocess.run([lint_imports(), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout
