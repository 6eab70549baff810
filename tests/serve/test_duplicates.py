"""`cbir duplicates`: the groups of GET /duplicates, in-process on the index and against a running gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from duplicates_calibration import variants
from factories import copy_collection
from servers import serve_in_thread

from services.cli import main as cbir
from services.serve.duplicates import render_groups


@pytest.fixture
def collection_with_copies(tmp_path: Path, mini_collection: Path, monkeypatch: pytest.MonkeyPatch,
                           cbir_env: Path) -> dict[str, str]:
    """A small class-layout collection holding two originals, a JPEG and a brightened copy of each, and other
    images; indexed. Returns the copies' file names by their original's."""
    root = copy_collection(mini_collection, tmp_path / "mine", train=3, test=0) / "train"
    copies = {}
    for name in ("0000.jpg", "0001.jpg"):
        original = root / "dog" / name
        made = variants(original.read_bytes())
        (root / "dog" / f"jpeg-{name}").write_bytes(made["jpeg"])
        (root / "dog" / f"bright-{name}.png").write_bytes(made["bright"])
        copies[name] = f"jpeg-{name}"
    monkeypatch.setenv("CBIR_DATA_DIR", str(root))
    cbir(["index", "--no-progress", "--layout", "class"])
    return copies


def check(body: dict, copies: dict[str, str]) -> None:
    groups = [{member["filename"] for member in group["members"]} for group in body["groups"]]
    for original, copy in copies.items():
        assert {original, copy, f"bright-{original}.png"} in groups, groups


def test_in_process_prints_the_groups_of_the_index(collection_with_copies: dict[str, str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cbir(["duplicates", "--local", "--json"])
    body = json.loads(capsys.readouterr().out)
    check(body, collection_with_copies)
    cbir(["duplicates", "--local", "--limit", "1"])
    table = capsys.readouterr().out
    assert table.startswith(f"{body['groups_total']} groups of near duplicates among {body['documents']} images")
    assert "group 1: 3 images" in table and "keep" in table and "group 2" not in table


def test_against_a_gateway_and_an_unreachable_one(collection_with_copies: dict[str, str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from services.serve.apps import gateway_app

    with serve_in_thread(gateway_app()) as url:
        cbir(["duplicates", "--url", url, "--json", "--threshold", "0.95"])
    body = json.loads(capsys.readouterr().out)
    assert body["threshold"] == 0.95
    check(body, collection_with_copies)
    with pytest.raises(SystemExit) as exited:
        cbir(["duplicates", "--url", url])  # stopped now
    assert exited.value.code == 3


def test_the_table_marks_the_copy_to_keep() -> None:
    member = {"id": "a1", "filename": "x.jpg", "source": "upload", "label": None, "size": 2048, "mtime": 0.0,
              "similarity": 1.0}
    body = {"groups_total": 1, "documents": 9, "threshold": 0.93, "offset": 0, "unreadable": 1,
            "groups": [{"keep": "b2", "members": [member, {**member, "id": "b2", "similarity": 0.97}]}]}
    lines = render_groups(body).splitlines()
    assert lines[0] == "1 groups of near duplicates among 9 images (threshold 0.93; groups 1–1)"
    assert lines[2] == "group 1: 2 images"
    assert lines[4].split()[:3] == ["keep", "0.970", "b2"] and lines[3].split()[:2] == ["1.000", "a1"]
    assert "1 images left out" in lines[-1]
