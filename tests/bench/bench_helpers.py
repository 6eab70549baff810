"""Helpers of the speed benches' tests (imported by name: tests/bench/ is on the path, see conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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

