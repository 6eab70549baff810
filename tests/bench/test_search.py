"""bench/search.py: `cbir serve` under 1–64 clients, its latency and QPS against the yardsticks."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_helpers import child_pids, load_bench_script, read_result


@pytest.mark.slow
def test_quick_run_measures_latency_qps_and_memory(quick_args: list[str], tmp_path: Path,
                                                   mini_collection: Path) -> None:
    before = child_pids()
    load_bench_script("search").main([*quick_args, "--data-dir", str(mini_collection), "--limit-per-class", "2",
                                      "--duration", "0.5", "--warmup-duration", "0.2", "--clients", "1,4,16"])
    assert child_pids() <= before  # cbir index and cbir serve are gone
    result = read_result(tmp_path / "results", "search")
    settings = result["settings"]
    assert settings["images"] == 20 and settings["clients"] == [1, 4, 16]
    sticks = {s["batch"]: s for s in result["yardsticks"]}
    assert set(sticks) == {1, 4, 16} and all(s["views"] == settings["query_views"] for s in sticks.values())
    runs = result["details"]["runs"]
    assert all(runs[n]["errors"] == 0 and runs[n]["requests"] > 0 for n in ("1", "4", "16"))
    goals = {g["goal"].split(":")[0]: g for g in result["goals"]}

    p50_ratio = runs["1"]["p50_ms"] / (1000 / sticks[1]["images_per_second"])
    assert goals["one client"]["ratio"] == pytest.approx(p50_ratio, rel=1e-2)
    assert goals["one client"]["met"] is (p50_ratio <= 2) and goals["one client"]["target"] == "≤ 2"

    qps_ratio = runs["16"]["qps"] / sticks[16]["images_per_second"]
    assert goals["16 clients"]["ratio"] == pytest.approx(qps_ratio, rel=1e-2)
    assert goals["16 clients"]["met"] is (qps_ratio >= 0.5) and goals["16 clients"]["conditions"] == {"0 errors": True}

    rows = {row["name"]: row for row in result["figures"]}
    assert rows["peak RSS of cbir serve"]["value"] > 50
    assert rows["cbir serve: start to ready (compiled)"]["value"] >= rows["cbir serve: start to first answer"]["value"]
