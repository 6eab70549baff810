"""Helpers of the speed benches' tests (imported by name: tests/bench/ is on the path, see conftest.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from services.common.collection import REPO_ROOT


def child_pids() -> set[int]:
    """The live processes this test process started (from /proc)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def read_result(directory: Path, name: str) -> dict[str, Any]:
    return json.loads((directory / f"{name}.json").read_text())


def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py, which is a script rather than part of the installed package (loaded once)."""
    module_name = f"bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
    return sys.modules[module_name]
