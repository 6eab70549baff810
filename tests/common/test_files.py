"""Files written whole or not at all (services/common/files.py)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pytest

from services.common.files import write_atomically


def test_the_file_is_replaced_whole_and_no_temporary_file_stays(tmp_path: Path) -> None:
    target = tmp_path / "index.npz"
    target.write_bytes(b"before")
    write_atomically(target, lambda file: file.write(b"after"))
    assert target.read_bytes() == b"after"
    assert [p.name for p in tmp_path.iterdir()] == ["index.npz"]


def test_a_failed_write_leaves_the_file_as_it_was_and_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "serving.json"
    target.write_bytes(b"before")

    def half_then_fail(file: BinaryIO) -> None:
        file.write(b"half of it")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_bytes() == b"before"
    assert [p.name for p in tmp_path.iterdir()] == ["serving.json"]


def test_the_temporary_name_takes_the_prefix_asked_for(tmp_path: Path) -> None:
    def temporaries() -> list[str]:  # the temporary files beside the target while it is being written
        return [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    seen: list[list[str]] = []
    write_atomically(tmp_path / "abc.png", lambda file: seen.append(temporaries()), temp_prefix=".")
    write_atomically(tmp_path / "abc.png", lambda file: seen.append(temporaries()))
    [[hidden], [named]] = seen
    assert hidden.startswith(".") and not hidden.startswith(".abc.png")
    assert named.startswith("abc.png.")
