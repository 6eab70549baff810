"""bench/scale.py at N = 10⁴ (what CI runs): every option measured, exact search exact, the report written."""

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
