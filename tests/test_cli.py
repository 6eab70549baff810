"""The `cbir` command (services/cli.py): `cbir index DIR` with a layout and a machine-readable summary, and
`cbir promote`'s refusal off Elasticsearch, the comparison commands' refusals."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from services.cli import main


def test_cbir_index_dir_prints_its_counts_as_one_json_line(cbir_env: Path, mini_collection: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(mini_collection / "train" / "cat", photos / "2024")
    (photos / "notes.txt").write_text("not an image")  # not an image name: never listed
    main(["index", str(photos), "--layout", "flat", "--json", "--no-progress"])
    assert json.loads(capsys.readouterr().out) == {"total": 50, "added": 50, "updated": 0, "unchanged": 0,
                                                   "removed": 0, "skipped": 0, "documents": 50}
    (photos / "2024" / "0000.jpg").unlink()
    main(["index", str(photos), "--sync", "--json", "--no-progress"])  # auto: no split, no class folders only
    assert json.loads(capsys.readouterr().out)["removed"] == 1


def test_cbir_promote_needs_elasticsearch(cbir_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        main(["promote", "vgg16-10c-0-d64-w2"])
    assert exit_info.value.code == 2 and "CBIR_BACKEND=elasticsearch" in caplog.text


@pytest.mark.parametrize(("argv", "message"), [
    (["compare", "--rows", "vgg19"], "--rows 'vgg19': name some of bovw, mlp"),
    (["train-bovw", "--classifiers", "xgboost"], "--classifiers 'xgboost': name some of gnb, logreg"),
    (["train", "--time-budget-min", "0"], "--time-budget-min must be above 0"),
])
def test_the_comparison_commands_refuse_bad_options_with_one_line(argv: list[str], message: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in caplog.text
