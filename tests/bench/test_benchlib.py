"""bench/benchlib.py: the idle check, the yardstick, goals and the result file."""

from __future__ import annotations

import re
from pathlib import Path

import benchlib
import pytest
import torch
from bench_helpers import read_result

from services.embedder.bundle import Bundle


def test_commit_is_head_with_a_dirty_mark() -> None:
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", benchlib.commit())


def test_machine_names_the_cpu_torch_and_gpu() -> None:
    machine = benchlib.machine()
    assert machine["cores"] >= 1 and machine["torch"] == torch.__version__
    assert machine["torch_threads"] == torch.get_num_threads()
    assert machine["cuda"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    assert machine["cpu"] and re.match(r"\d{4}-\d\d-\d\dT", machine["date"])


def test_an_idle_machine_is_measured_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchlib, "load_average", lambda: 0.2)
    seen = benchlib.require_idle(0.5, wait_s=60)
    assert seen == {"load_1min": 0.2, "max_load": 0.5, "waited_s": 0.0, "busy": False}


def test_a_busy_machine_is_refused_with_exit_code_3(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(benchlib, "load_average", lambda: 3.5)
    with pytest.raises(SystemExit) as refused:
        benchlib.require_idle(0.5, wait_s=0)
    assert refused.value.code == benchlib.BUSY_EXIT_CODE == 3
    assert "3.50" in capsys.readouterr().err


def test_allow_busy_records_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchlib, "load_average", lambda: 3.5)
    assert benchlib.require_idle(0.5, wait_s=0, allow_busy=True)["busy"] is True


def test_it_waits_for_the_load_to_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    readings, slept = iter([2.0, 1.0, 0.4]), []
    monkeypatch.setattr(benchlib, "load_average", lambda: next(readings))
    monkeypatch.setattr(benchlib.time, "sleep", slept.append)
    seen = benchlib.require_idle(0.5, wait_s=60, poll_s=5)
    assert seen["busy"] is False and seen["load_1min"] == 0.4 and slept == [5, 5]


def test_yardstick_counts_images_of_each_views_passes(tiny_bundle: Bundle) -> None:
    cpu = torch.device("cpu")
    one = benchlib.yardstick(tiny_bundle, 4, 1, device=cpu, seconds=0.05, warmup=1)
    two = benchlib.yardstick(tiny_bundle, 4, 2, device=cpu, seconds=0.05, warmup=1)
    for stick in (one, two):
        assert stick.mode == "eager bf16" and stick.batch == 4 and stick.batches >= 3
        assert stick.images_per_second > 0 and stick.seconds >= 0.05
        assert stick.seconds_per_image == pytest.approx(1 / stick.images_per_second)
    assert (one.views, two.views) == (1, 2)
    with pytest.raises(ValueError, match="views 3"):
        benchlib.yardstick(tiny_bundle, 4, 3, device=cpu, seconds=0.01)


def test_views_follow_the_bundle(tiny_bundle: Bundle) -> None:
    pre = tiny_bundle.preprocessing
    assert benchlib.views_for(tiny_bundle, "query") == (2 if pre.flip_for("query") else 1)
    assert benchlib.views_for(tiny_bundle, "index") == (2 if pre.flip_for("index") else 1)


def test_goals_hold_one_bound_and_their_conditions() -> None:
    assert benchlib.goal("g", "f", 0.6, at_least=0.5)["met"] is True
    assert benchlib.goal("g", "f", 0.4, at_least=0.5)["met"] is False
    assert benchlib.goal("g", "f", 2.0, at_most=2)["met"] is True
    assert benchlib.goal("g", "f", 2.1, at_most=2) == {"goal": "g", "figure": "f", "ratio": 2.1, "target": "≤ 2",
                                                       "conditions": {}, "met": False}
    assert benchlib.goal("g", "f", 0.6, at_least=0.5, also={"0 errors": False})["met"] is False
    with pytest.raises(ValueError):
        benchlib.goal("g", "f", 1.0)


def test_write_result_adds_where_it_was_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stick = benchlib.Throughput(mode="eager bf16", device="cpu", batch=16, views=2, images_per_second=200.0,
                                mean_images_per_second=190.0, seconds=1.0, batches=13, first_call_s=0.1)
    row = benchlib.figure("QPS, 16 clients", 150.0, "queries/s", yardstick=stick)
    assert row["ratio"] == 0.75 and row["yardstick"] == {"mode": "eager bf16", "batch": 16, "views": 2,
                                                          "value": 200.0, "unit": "images/s"}
    path = benchlib.write_result("example", {"load": {"busy": True}, "settings": {"quick": True}, "figures": [row],
                                             "goals": [benchlib.goal("g", row["name"], 0.75, at_least=0.5)]},
                                 output_dir=tmp_path)
    result = read_result(tmp_path, "example")
    assert path == tmp_path / "example.json"
    assert {"name", "command", "commit", "machine", "busy", "settings", "figures", "goals"} <= result.keys()
    assert result["busy"] is True and result["commit"] == benchlib.commit()
    printed = capsys.readouterr().out
    assert "| QPS, 16 clients | 150 queries/s | 200 images/s (batch 16, 2 passes) | 0.75 | ≥ 0.5: **met** |" in printed


def test_linked_collection_takes_the_first_images_of_each_class(mini_collection: Path, tmp_path: Path) -> None:
    root, count = benchlib.collection_for(mini_collection, tmp_path, split="train", per_class=3)
    assert root == tmp_path / "collection" and count == 30
    for class_dir in (mini_collection / "train").iterdir():
        expected = sorted(p.name for p in class_dir.iterdir())[:3]
        assert sorted(p.name for p in (root / "train" / class_dir.name).iterdir()) == expected
