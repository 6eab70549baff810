"""bench/indexing.py: `cbir index` in-process (eager, and with a cached package) and through `cbir embedder`, timed
against the yardstick."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import child_pids, load_bench_script, read_result


@pytest.mark.slow
def test_quick_run_indexes_every_way_and_states_the_goal(quick_args: list[str], tmp_path: Path,
                                                         mini_collection: Path) -> None:
    before = child_pids()
    load_bench_script("indexing").main([*quick_args, "--data-dir", str(mini_collection), "--limit-per-class", "2"])
    assert child_pids() <= before  # the embedder and the indexers are gone
    result = read_result(tmp_path / "results", "indexing")
    assert result["settings"]["images"] == 20 and result["settings"]["compile"] == "off"
    (stick,) = result["yardsticks"]
    assert stick["batch"] == 64 and stick["views"] == result["settings"]["index_views"]
    runs = {run["mode"]: run for run in result["details"]["runs"]}
    assert set(runs) == {"in-process", "cached", "http"} and all(run["indexed"] == 20 for run in runs.values())
    assert runs["http"]["embedder_ready_s"] > 0 and runs["in-process"]["embedder_ready_s"] is None
    # cached: the package for batches of 64 built beforehand (not timed with the run), and run by `cbir index`
    assert runs["cached"]["package_build_s"] > 0 and runs["cached"]["packages"] == [64]
    assert runs["in-process"]["packages"] == [] and runs["in-process"]["package_build_s"] is None
    for run in runs.values():  # where the indexer's time went, from its summary line
        assert set(run["stage_seconds"]) == {"plan", "read", "embed", "write"}
        assert all(seconds >= 0 for seconds in run["stage_seconds"].values())
        assert run["stage_seconds"]["embed"] <= run["indexer_seconds"] + 0.05  # a summary rounds to 0.1 s
    goals = {g["figure"]: g for g in result["goals"]}
    rows = {row["name"]: row for row in result["figures"]}
    for mode, run in runs.items():
        rate = 20 / run["seconds"]
        ratio = rate / stick["images_per_second"]
        row, goal = rows[f"cbir index, {mode}"], goals[f"cbir index, {mode}"]
        assert row["value"] == pytest.approx(rate, rel=1e-3) and row["ratio"] == pytest.approx(ratio, rel=1e-3)
        assert goal["target"] == "≥ 0.9" and goal["met"] is (ratio >= 0.9)
        assert goal["ratio"] == pytest.approx(ratio, rel=1e-3)
