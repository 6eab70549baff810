"""bench/fanout.py: the model of one query's fan-out over S shards on T search threads, and its table."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from bench_helpers import load_bench_script, read_result

from services.common.collection import REPO_ROOT


def load_script() -> ModuleType:
    return load_bench_script("fanout")


@pytest.mark.parametrize(("threads", "limit", "waves"), [(4, 5, 8), (16, 5, 6), (16, None, 2), (4, None, 8)])
def test_one_query_waits_for_ceil_shards_over_its_lanes_waves(threads: int, limit: int | None, waves: int) -> None:
    """30 tasks of 1 ms each on min(T, limit) threads: ceil(30 / lanes) waves, plus the merge."""
    fanout = load_script()
    latencies = fanout.lone_query_latencies(np.array([0.001]), np.array([0.0002]), shards=30, threads=threads,
                                            limit=limit, queries=50, overhead_s=0.0, rng=np.random.default_rng(0))
    assert latencies == pytest.approx(np.full(50, waves * 0.001 + 0.0002))


def test_under_a_trickle_of_queries_latency_is_the_lone_querys_and_it_grows_with_load() -> None:
    fanout = load_script()
    args = {"shards": 30, "threads": 4, "limit": 5, "queries": 2000, "overhead_s": 0.0}
    costs, merges = np.array([0.001]), np.array([0.0])
    trickle = fanout.loaded_latencies(costs, merges, rate=1.0, rng=np.random.default_rng(0), **args)
    assert np.median(trickle) == pytest.approx(0.008)  # 8 waves: nothing else is queued
    busy = fanout.loaded_latencies(costs, merges, rate=120.0, rng=np.random.default_rng(0), **args)  # 90 % busy
    assert np.percentile(busy, 99) > 2 * np.percentile(trickle, 99)


def test_quick_run_writes_the_model_table_and_more_shards_on_fewer_threads_cost_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = load_script().main(["--quick", "--allow-busy", "--idle-wait", "0", "--output-dir", str(tmp_path),
                                 "--repeats", "10", "--queries", "300"])
    out = capsys.readouterr().out
    assert "A model, not a measurement of Elasticsearch" in out and result["table"] in out
    written = read_result(tmp_path, "fanout")
    assert written["settings"]["model"] == "simulation, not a measurement of Elasticsearch"
    assert written["settings"]["quick"] and written["settings"]["threads"] == [4, 16]

    rows = {(row["images"], row["index"], row["shards"]): row for row in written["model"]}
    assert set(rows) == {(n, kind, s) for n in (5_000, 20_000) for kind in ("flat", "hnsw") for s in (1, 5, 30)}
    table = written["table"].splitlines()
    assert len(table) == 2 + len(rows) and table[0].count("|") == 11  # 10 columns
    for row in rows.values():
        assert set(row["lone"]) == {"T=4", "T=16", "T=16, no limit"}
        assert all(cell["p99_ms"] >= cell["p50_ms"] > 0 for cell in row["lone"].values())

    def p50(n: int, kind: str, shards: int, threads: str = "T=4") -> float:
        return rows[(n, kind, shards)]["lone"][threads]["p50_ms"]

    for n in (5_000, 20_000):
        # HNSW: each shard's graph search costs about what the whole index's does, so 30 shards on 4 threads
        # are 8 waves of it.
        assert p50(n, "hnsw", 30) > p50(n, "hnsw", 1)
        for kind in ("flat", "hnsw"):
            assert p50(n, kind, 30, "T=4") > p50(n, kind, 30, "T=16") > p50(n, kind, 30, "T=16, no limit")
        assert rows[(n, "hnsw", 30)]["loaded"]["utilisation"] > rows[(n, "hnsw", 1)]["loaded"]["utilisation"]
        assert rows[(n, "hnsw", 30)]["break_even_overhead_ms"] is None  # slower than 1 shard already
        assert "break_even_overhead_ms" not in rows[(n, "hnsw", 1)]
    assert {figure["unit"] for figure in written["figures"]} == {"ms"}
    assert all(figure["name"].startswith("model (not Elasticsearch)") for figure in written["figures"])


def test_the_elasticsearch_doc_shows_the_recorded_model_table() -> None:
    recorded = json.loads((REPO_ROOT / "bench" / "results" / "fanout.json").read_text())
    assert not recorded["settings"]["quick"]
    doc = (REPO_ROOT / "docs" / "elasticsearch.md").read_text()
    assert recorded["table"] in doc, "copy bench/results/fanout.json's table into docs/elasticsearch.md, Shards"
