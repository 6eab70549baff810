"""bench/scale.py at N = 10⁴ (what CI runs): every option measured, exact search exact, the report written; and its
--writes run (bench/store_writes.py): the store's single writes timed at two sizes, the larger against the smaller."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_quick_scale_bench_measures_every_option_and_writes_its_report(tmp_path: Path) -> None:
    import scale

    report = tmp_path / "scale.md"
    scale.main(["--quick", "--allow-busy", "--output-dir", str(tmp_path), "--report", str(report)])
    rows = json.loads((tmp_path / "scale.json").read_text())["details"]["rows"]
    assert {row["option"] for row in rows} == {"flat", "hnsw", "ivf-flat", "ivf-sq8"}
    assert {row["n"] for row in rows} == {10_000}
    flat = next(row for row in rows if row["option"] == "flat")
    assert flat["recall_at_10"] == flat["recall_at_100"] == 1.0 and flat["memory_bytes"] >= 10_000 * 74 * 4
    ivf = [row for row in rows if row["option"] == "ivf-flat"]
    assert ivf[0]["recall_at_100"] <= ivf[-1]["recall_at_100"]  # more probes, no less recall
    text = report.read_text()
    assert "| 10,000 | flat |" in text and "CBIR_FAISS_INDEX=auto" in text


def test_synthetic_vectors_are_unit_length_and_keep_their_class_in_the_one_hot_part() -> None:
    import numpy as np
    import scale

    centres = scale.Centres.draw(np.random.default_rng(0))
    vectors = centres.sample(1000, np.random.default_rng(1))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (np.argmax(vectors[:, scale.PCA_DIMS:], axis=1) == np.arange(1000) % scale.CLASSES).all()


def test_the_quick_write_bench_times_single_adds_and_removes_at_two_sizes_against_the_smallest(tmp_path: Path) -> None:
    import scale

    scale.main(["--writes", "--quick", "--allow-busy", "--idle-wait", "0", "--output-dir", str(tmp_path)])
    result = json.loads((tmp_path / "scale_writes.json").read_text())
    assert result["command"].startswith("python bench/scale.py --writes")
    rows = result["details"]["rows"]
    assert [row["n"] for row in rows] == [2_000, 20_000]
    assert all(row["count_after"] == row["n"] and row["index_kind"] == "flat" for row in rows)  # as many in as out
    assert all(0 < row[op]["p50_ms"] <= row[op]["p99_ms"] for row in rows for op in ("add", "remove"))
    assert {goal["figure"] for goal in result["goals"]} == {
        f"N=20,000: single {op}, {stat} (flat)" for op in ("add", "remove") for stat in ("p50", "p99")}
    goal = result["goals"][0]
    figure = next(f for f in result["figures"] if f["name"] == goal["figure"])
    assert figure["ratio"] == goal["ratio"] == pytest.approx(figure["value"] / result["figures"][0]["value"], rel=1e-2)
