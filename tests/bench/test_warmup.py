"""bench/warmup.py: a cold `cbir serve` searched from its first 200, then restarted with its compile cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bench_helpers import child_pids, load_bench_script, read_result
from benchlib import Throughput


def stick(ms_per_query: float) -> Throughput:
    return Throughput(mode="eager bf16", device="cpu", batch=1, views=2, images_per_second=1000 / ms_per_query,
                      mean_images_per_second=1000 / ms_per_query, seconds=1.0, batches=10, first_call_s=0.1)


def test_the_goals_judge_the_settled_p50_every_search_and_both_starts() -> None:
    warmup = load_bench_script("warmup")
    # Searches at 0-9 s take 90 ms (the first seconds are left out of the p50), then 30 ms; one of 110 ms.
    searches = [(0.5 * n, 0.090) for n in range(20)] + [(10 + 0.1 * n, 0.030) for n in range(50)] + [(16.0, 0.110)]
    run = warmup.WarmUpRun(first_answer_s=4.0, ready_s=60.0, searches=searches, errors=0)
    summary = warmup.summarize(run, stick_ms=20.0, settle_s=10.0)
    assert summary["searches"] == 71 and summary["settled_searches"] == 51
    assert summary["p50_ms"] == pytest.approx(30.0) and summary["p50_ratio"] == pytest.approx(1.5)
    assert summary["worst_ms"] == pytest.approx(110.0) and summary["worst_ratio"] == pytest.approx(5.5)
    figures, goals = warmup.figures_and_goals(summary, cold=run, warm_ready_s=16.0, stick=stick(20.0), settle_s=10.0)
    assert [g["met"] for g in goals] == [True, False, True, False]  # p50 1.5 ≤ 2; 5.5 > 5; 60 ≤ 120 s; 16 > 15 s
    assert goals[0]["ratio"] == pytest.approx(1.5) and goals[1]["ratio"] == pytest.approx(5.5)
    assert goals[2]["ratio"] == 60.0 and goals[3]["ratio"] == 16.0
    rows = {row["name"]: row for row in figures}
    assert rows["cold start: start to ready (empty compile cache)"]["value"] == 60.0
    run.took_ms = [80.0] * 20 + [20.0] * 50 + [12.5]  # the slow one spent 12.5 ms of its 110 in the server
    assert warmup.slowest(run, count=2) == [[16.0, 110.0, 12.5], [0.0, 90.0, 80.0]]
    assert rows["cold start, one client: p50 after the first 10 s (51 searches)"]["yardstick"]["value"] == 20.0


def test_a_start_that_never_gets_ready_or_fails_a_search_meets_no_goal() -> None:
    warmup = load_bench_script("warmup")
    run = warmup.WarmUpRun(first_answer_s=4.0, ready_s=None, searches=[(11.0, 0.02)], errors=1)
    summary = warmup.summarize(run, stick_ms=20.0, settle_s=10.0)
    _, goals = warmup.figures_and_goals(summary, cold=run, warm_ready_s=None, stick=stick(20.0), settle_s=10.0)
    assert [g["met"] for g in goals] == [False, True, False, False]  # 1 error; one fast search; never ready
    assert math.isnan(goals[2]["ratio"]) and goals[0]["conditions"] == {"0 errors": False}


@pytest.mark.slow
def test_quick_run_searches_from_the_first_answer_and_restarts(quick_args: list[str], tmp_path: Path,
                                                               mini_collection: Path) -> None:
    before = child_pids()
    load_bench_script("warmup").main([*quick_args, "--data-dir", str(mini_collection), "--limit-per-class", "2",
                                      "--after-ready", "0.5"])
    assert child_pids() <= before  # cbir index and both cbir serve are gone
    result = read_result(tmp_path / "results", "warmup")
    details = result["details"]
    assert result["settings"]["compile"] == "off" and details["errors"] == 0 and details["searches"] > 0
    assert details["restart_ready_s"] > 0 and details["ready_s"] >= details["first_answer_s"]
    assert [s["batch"] for s in result["yardsticks"]] == [1]
    before_and_after = result["yardsticks_before_and_after"]  # the faster of the two counts
    assert len(before_and_after) == 2
    assert result["yardsticks"][0] == max(before_and_after, key=lambda s: s["images_per_second"])
    assert details["warm_up_progress"][-1][1] is None  # uncompiled: /healthz has no warm-up to report
    assert {g["goal"].split(":")[0] for g in result["goals"]} == {"cold start", "restart"}
