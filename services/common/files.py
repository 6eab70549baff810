"""Files written whole or not at all: what the index, the serving record and the uploads are saved with."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, write: Callable[[BinaryIO], object], *, temp_prefix: str | None = None) -> None:
    """Replace `path` by what `write(file)` writes, or leave it as it was: the bytes go to a temporary sibling
    (named `temp_prefix` + random + `.tmp`; default `path.name` + `.`), which is fsynced and renamed over `path`;
    then the folder is fsynced, so the rename itself survives a power cut. The folder must exist.

    >>> write_atomically(state / "serving.json", lambda file: file.write(json.dumps(record).encode()))
    """
    prefix = f"{path.name}." if temp_prefix is None else temp_prefix
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
