"""`cbir` as a subprocess of a test: its environment, its start, and the index file it writes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from benchlib import free_port, stop_process  # noqa: F401 - re-exported: one copy, shared with the benches

from services.common.collection import REPO_ROOT


def python_path() -> str:
    """PYTHONPATH for a Python subprocess of a test: the repository (services) and tests/ (the helper
    modules, such as factories), ahead of this process's own."""
    return os.pathsep.join(filter(None, [str(REPO_ROOT), str(Path(__file__).resolve().parent),
                                         os.environ.get("PYTHONPATH")]))


def subprocess_env(model_dir: Path, data_dir: Path, state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a `cbir` subprocess: this one's, with CBIR_* pointing at test data."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CBIR_")}
    env.update(CBIR_MODEL_DIR=str(model_dir), CBIR_DATA_DIR=str(data_dir), CBIR_STATE_DIR=str(state_dir),
               CBIR_BACKEND="faiss", CBIR_COMPILE="off", PYTHONUNBUFFERED="1", PYTHONPATH=python_path())
    env.update(extra)
    return env


def start_cbir(*args: str, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """`cbir <args>` as a subprocess (`python -m services.cli`), its stdout and stderr written to `log`."""
    with log.open("wb") as output:
        return subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env, cwd=cwd, stdout=output,
                                stderr=subprocess.STDOUT)


def read_index(path: Path) -> Mapping[str, np.ndarray]:
    """The arrays of a FAISS store file, read directly (no store code involved)."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
