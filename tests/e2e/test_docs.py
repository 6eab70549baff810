"""The README matches the code: its two commands, CI, every setting documented, and the performance table
the result files in bench/results/ give."""

from __future__ import annotations

import re

import pytest
from bench_helpers import load_bench_script

from services.common.collection import REPO_ROOT
from services.embedder.settings import EmbedderSettings
from services.indexer.settings import IndexerSettings
from services.search.settings import SearchSettings

README = (REPO_ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_opens_with_the_run_and_test_commands() -> None:
    run, test = readme_commands()
    assert run.endswith("cbir serve") and "pip install" in run
    assert "pytest" in test and "[test]" in test


def test_ci_runs_the_readme_test_command() -> None:
    _, test = readme_commands()
    assert test in (REPO_ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("settings", [SearchSettings, IndexerSettings, EmbedderSettings])
def test_every_setting_is_documented(settings: type) -> None:
    missing = [f"CBIR_{name.upper()}" for name in settings.model_fields if f"`CBIR_{name.upper()}`" not in README]
    assert not missing, f"README lacks {missing}"


def test_the_performance_table_is_what_the_result_files_give() -> None:
    report = load_bench_script("report")
    assert report.main(["--check", "--readme", str(REPO_ROOT / "README.md"),
                        "--results", str(REPO_ROOT / "bench" / "results")]) == 0, "run python bench/report.py"
