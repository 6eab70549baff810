"""bench/watch.py: the delay from a file change in a watched folder to search showing it, p50 and p99."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import child_pids, load_bench_script, read_result


def test_the_plan_alternates_adds_and_removes_and_refuses_more_removals_than_files() -> None:
    watch = load_bench_script("watch")
    assert watch.change_plan(3, 5) == [("add", 0), ("remove", 0), ("add", 1), ("remove", 1), ("add", 2)]
    with pytest.raises(SystemExit, match="at most twice"):
        watch.change_plan(2, 5)


def test_p99_over_a_hundred_changes_lies_between_the_two_slowest() -> None:
    watch = load_bench_script("watch")
    summary = watch.summarize([0.5] * 98 + [2.0, 4.0])
    assert summary["p50"] == 0.5 and 2.0 < summary["p99"] < 4.0 and summary["max"] == 4.0
    assert summary["count"] == 100


def test_the_goal_is_on_the_p99_delay_in_seconds() -> None:
    import benchlib

    watch = load_bench_script("watch")
    stick = benchlib.Throughput(mode="eager bf16", device="cpu", batch=1, views=2, images_per_second=50.0,
                                mean_images_per_second=50.0, seconds=1.0, batches=50, first_call_s=0.1)
    measured = [{"change": "add" if i % 2 == 0 else "remove", "seconds": 6.0 if i >= 98 else 1.0} for i in range(100)]
    figures, [goal] = watch.figures_and_goals(measured, stick)
    rows = {row["name"]: row for row in figures}
    assert rows["p50 delay, change to search"]["value"] == 1.0
    assert rows["p50 delay, change to search"]["ratio"] == pytest.approx(50.0)  # 1 s over 20 ms a query
    assert rows["p99 delay, change to search"]["value"] == 6.0 and not goal["met"]  # the two slowest: 2 of 100
    assert set(rows) >= {"p50 delay, add", "p50 delay, remove"}


@pytest.mark.slow
def test_quick_run_measures_every_change_through_search(quick_args: list[str], tmp_path: Path,
                                                        mini_collection: Path) -> None:
    before = child_pids()
    load_bench_script("watch").main([*quick_args, "--data-dir", str(mini_collection), "--limit-per-class", "2"])
    assert child_pids() <= before  # cbir serve is gone
    result = read_result(tmp_path / "results", "watch")
    changes = result["details"]["changes"]
    assert [c["change"] for c in changes] == ["add", "remove"] * 5
    assert all(0 < c["seconds"] < 60 for c in changes)
    assert result["details"]["first_reconcile"]["added"] == 20
    assert result["details"]["watcher"]["errors"] == []
    [goal] = result["goals"]
    assert goal["met"] is (result["details"]["summary"]["p99"] <= 5.0)
