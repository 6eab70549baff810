"""bench/report.py: docs/performance.md's table is what the result files give, between its markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_helpers import load_bench_script

DOC = "# Performance\n\n## Results\n\nintro\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\n## Goals\n"


def result_file(directory: Path, name: str, *, met: bool, busy: bool = False) -> dict:
    result = {
        "name": name, "command": f"python bench/{name}.py", "commit": "0123456789abcdef" * 2 + "01234567+dirty",
        "machine": {"cpu": "AMD EPYC", "cores": 2, "cuda": None, "torch": "2.14.1", "torch_threads": 2,
                    "date": "2026-12-01T09:00:00+00:00"},
        "busy": busy, "load": {"load_1min": 1.5 if busy else 0.1}, "settings": {"quick": False},
        "figures": [{"name": "QPS, 16 clients", "value": 151.26, "unit": "queries/s", "ratio": 0.5042,
                     "yardstick": {"mode": "eager bf16", "batch": 16, "views": 2, "value": 300.0, "unit": "images/s"}},
                    {"name": "peak RSS of cbir serve", "value": 955.3, "unit": "MB"}],
        "goals": [{"goal": "16 clients", "figure": "QPS, 16 clients", "ratio": 0.5042, "target": "≥ 0.5",
                   "conditions": {"0 errors": met}, "met": met}],
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result))
    return result


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "performance.md"
    path.write_text(DOC)
    return path


def test_the_table_is_written_between_the_markers_and_then_checks(tmp_path: Path, doc: Path) -> None:
    report = load_bench_script("report")
    results = tmp_path / "results"
    result_file(results, "search", met=True)
    result_file(results, "forward", met=False, busy=True)
    args = ["--doc", str(doc), "--results", str(results)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0
    text = doc.read_text()
    assert text.startswith("# Performance\n\n## Results\n\nintro\n\n<!-- bench:begin -->\n")
    assert text.endswith("<!-- bench:end -->\n\n## Goals\n") and "old table" not in text
    assert text.index("**forward**") < text.index("**search**")  # the benches' order, not the files'
    assert "AMD EPYC, 2 cores, no GPU; torch 2.14.1 (2 threads) · 2026-12-01 · commit `0123456789ab`+dirty" in text
    row = "| QPS, 16 clients | 151 queries/s | 300 images/s (batch 16, 2 passes) | 0.504 | ≥ 0.5, 0 errors: **met** |"
    assert row in text
    assert "≥ 0.5, 0 errors: **not met**" in text and "recorded while busy: load 1.5" in text
    assert "| peak RSS of cbir serve | 955 MB | – | – |  |" in text
    assert report.main([*args, "--check"]) == 0
    result_file(results, "search", met=False)
    assert report.main([*args, "--check"]) == 1


def test_no_results_give_the_placeholder(tmp_path: Path, doc: Path) -> None:
    report = load_bench_script("report")
    args = ["--doc", str(doc), "--results", str(tmp_path / "none")]
    assert report.main(args) == 0 and report.PLACEHOLDER in doc.read_text()
    assert report.main([*args, "--check"]) == 0


def test_a_document_without_markers_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "performance.md"
    path.write_text("# Performance\n")
    with pytest.raises(SystemExit, match="markers"):
        load_bench_script("report").main(["--doc", str(path), "--results", str(tmp_path), "--check"])
