"""The `cbir` command (services/cli.py): `cbir index DIR` with a layout and a machine-readable summary, `cbir index
DIR --watch` as a process that follows the folder until SIGTERM, `cbir promote`'s refusal off Elasticsearch, the
comparison commands' refusals."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from processes import read_index, start_cbir, subprocess_env

from services.cli import main
from services.common.collection import CollectionImage


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


def watcher_lines(log: Path) -> list[dict]:
    """The watcher's state lines (stdout) among the log's lines (stderr, in the same file)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"folder"')]


def wait_for_line(log: Path, process: subprocess.Popen, condition: Callable[[dict], bool], *,
                  timeout_s: float = 120.0) -> dict:
    """The last JSON line of `cbir index --watch` that meets `condition`, polled for (the process must live)."""
    started = time.monotonic()
    while not (lines := [line for line in watcher_lines(log) if condition(line)]):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - started < timeout_s, log.read_text()[-3000:]
        time.sleep(0.1)
    return lines[-1]


def test_cbir_index_watch_follows_the_folder_until_sigterm_and_reports_each_batch(
        tmp_path: Path, tiny_bundle_dir: Path, mini_collection: Path) -> None:
    folder, state, log = tmp_path / "photos", tmp_path / "state", tmp_path / "watch.log"
    folder.mkdir()
    shutil.copy(mini_collection / "test" / "cat" / "0000.jpg", folder / "cat.jpg")
    env = subprocess_env(tiny_bundle_dir, mini_collection, state, CBIR_WATCH_SETTLE_MS="100")
    process = start_cbir("index", str(folder), "--watch", "--json", "--no-progress", env=env, cwd=tmp_path, log=log)
    try:
        first = wait_for_line(log, process, lambda line: line["batches"] == 1)
        assert first["state"] == "running" and first["last_batch"]["added"] == 1
        shutil.copy(mini_collection / "test" / "dog" / "0000.jpg", folder / "dog.jpg")
        (folder / "cat.jpg").unlink()

        def both_followed(line: dict) -> bool:  # the add and the removal: in one batch or two
            batches = watcher_lines(log)
            return (line["last_batch"]["documents"] == 1 and sum(b["last_batch"]["added"] for b in batches) == 2
                    and sum(b["last_batch"]["removed"] for b in batches) == 1)

        changed = wait_for_line(log, process, both_followed)
        assert changed["errors"] == [] and changed["folder"] == str(folder.resolve())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert "stopped watching" in log.read_text()
    assert (state / "serving.json").is_file()  # one machine's index, recorded as served
    dog = CollectionImage.from_relative(str(folder.resolve()), "dog.jpg", None).id
    assert list(read_index(state / "index.npz")["ids"]) == [dog]


def test_cbir_index_watch_refuses_a_rebuild(cbir_env: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(tmp_path), "--watch", "--rebuild", "--no-progress"])
    assert exit_info.value.code == 2


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
