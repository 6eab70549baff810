"""bench/search.py: `cbir serve` under 1–256 clients, its latency and QPS against the yardsticks, in one run or
several (--repeat), each reported."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from bench_helpers import child_pids, load_bench_script, read_result


def stick(batch: int, images_per_second: float) -> object:
    benchlib = load_bench_script("benchlib")
    return benchlib.Throughput(mode="eager bf16", device="cpu", batch=batch, views=2,
                               images_per_second=images_per_second, mean_images_per_second=images_per_second,
                               seconds=1.0, batches=10, first_call_s=0.1)


def load_run(*, answered: list[float], refused: int = 0, other_errors: int = 0, seconds: float = 10.0) -> object:
    load = load_bench_script("load")
    kinds = Counter({"HTTP 503": refused} if refused else {}) + Counter({"ReadError": other_errors})
    return load.LoadResult(requests=len(answered) + refused + other_errors, errors=refused + other_errors,
                           seconds=seconds, latencies=answered, error_kinds=kinds)


STICKS = {1: stick(1, 50.0), 16: stick(16, 200.0), 64: stick(64, 300.0)}


def goals_of(runs: dict[int, object], **options: object) -> dict[str, dict]:
    _, goals = load_bench_script("search").figures_and_goals(runs, STICKS, **options)
    return {goal["goal"].split(":")[0]: goal for goal in goals}


def test_each_goal_is_its_ratio_to_its_yardstick() -> None:
    runs = {1: load_run(answered=[0.03] * 100),  # 30 ms against 20 ms a query: 1.5
            16: load_run(answered=[0.1] * 1000),  # 100 QPS against 200: 0.5
            64: load_run(answered=[0.2] * 1100, other_errors=1)}  # 110 QPS against 300, one error
    goals = goals_of(runs)
    assert goals["one client"]["ratio"] == pytest.approx(1.5) and goals["one client"]["met"]
    assert goals["16 clients"]["ratio"] == pytest.approx(0.5) and goals["16 clients"]["met"]
    assert goals["64 clients"]["ratio"] == pytest.approx(110 / 300, rel=1e-3)
    assert not goals["64 clients"]["met"] and goals["64 clients"]["conditions"] == {"0 errors": False}


def test_more_clients_than_the_micro_batch_are_held_to_its_yardstick() -> None:
    search = load_bench_script("search")
    figures, _ = search.figures_and_goals({256: load_run(answered=[0.5] * 600)}, STICKS)
    [qps] = [f for f in figures if f["name"].startswith("QPS, 256 clients")]
    assert search.bound_batch(256) == 64 and qps["yardstick"]["batch"] == 64
    assert qps["ratio"] == pytest.approx(60 / 300)


def test_the_overload_row_reports_the_answered_p99_and_the_share_refused() -> None:
    answered = [0.2] * 95 + [0.9] * 4 + [3.0]  # p99: the 99th of 100, 0.9 s
    goals = goals_of({256: load_run(answered=answered, refused=300)})
    overload = goals["256 clients"]
    assert overload["ratio"] == pytest.approx(0.9) and overload["met"]
    assert "75% of 400 refused with 503" in overload["figure"]
    slow = goals_of({256: load_run(answered=[1.5] * 100, refused=10)})["256 clients"]
    assert not slow["met"]
    broken = goals_of({256: load_run(answered=[0.2] * 100, refused=10, other_errors=1)})["256 clients"]
    assert not broken["met"] and broken["conditions"]["no error but 503"] is False


def test_the_runs_of_a_repeat_are_named_apart() -> None:
    goals = goals_of({16: load_run(answered=[0.1] * 1000)}, prefix="run 2 of 3: ")
    assert list(goals) == ["run 2 of 3"] and goals["run 2 of 3"]["figure"].startswith("run 2 of 3: QPS, 16 clients")


@pytest.mark.slow
def test_quick_run_measures_latency_qps_and_memory(quick_args: list[str], tmp_path: Path,
                                                   mini_collection: Path) -> None:
    before = child_pids()
    load_bench_script("search").main([*quick_args, "--data-dir", str(mini_collection), "--limit-per-class", "2",
                                      "--duration", "0.5", "--warmup-duration", "0.2", "--clients", "1,4,16",
                                      "--repeat", "2"])
    assert child_pids() <= before  # cbir index and cbir serve are gone
    result = read_result(tmp_path / "results", "search")
    settings = result["settings"]
    assert settings["images"] == 20 and settings["clients"] == [1, 4, 16] and settings["repeat"] == 2
    assert len(result["yardsticks"]) == 2 * 3  # batches 1, 4 and 16, measured again for each run
    sticks = {s["batch"]: s for s in result["yardsticks"][:3]}
    assert set(sticks) == {1, 4, 16} and all(s["views"] == settings["query_views"] for s in sticks.values())
    repeats = result["details"]["repeats"]
    assert len(repeats) == 2
    runs = repeats[0]["runs"]
    assert all(runs[n]["errors"] == 0 and runs[n]["requests"] > 0 for n in ("1", "4", "16"))
    assert [g["goal"].split(":")[0] for g in result["goals"]] == ["run 1 of 2"] * 2 + ["run 2 of 2"] * 2
    first = [g for g in result["goals"] if g["goal"].startswith("run 1 of 2")]
    p50_ratio = runs["1"]["p50_ms"] / (1000 / sticks[1]["images_per_second"])
    assert first[0]["ratio"] == pytest.approx(p50_ratio, rel=1e-2) and first[0]["met"] is (p50_ratio <= 2)
    qps_ratio = runs["16"]["qps"] / sticks[16]["images_per_second"]
    assert first[1]["ratio"] == pytest.approx(qps_ratio, rel=1e-2) and first[1]["met"] is (qps_ratio >= 0.5)
    assert result["details"]["all_goals_met"] is all(g["met"] for g in result["goals"])

    rows = {row["name"]: row for row in result["figures"]}
    assert rows["run 1 of 2: peak RSS of cbir serve"]["value"] > 50
    assert (rows["run 2 of 2: cbir serve: start to ready (compiled)"]["value"]
            >= rows["run 2 of 2: cbir serve: start to first answer"]["value"])
