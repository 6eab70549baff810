"""The README and docs/ match the code: the README's two commands, CI, every setting documented in
docs/configuration.md, and docs/performance.md's table the result files in bench/results/ give."""

from __future__ import annotations

import re

import pytest
from bench_helpers import load_bench_script

from services.common.collection import REPO_ROOT
from services.embedder.settings import EmbedderSettings
from services.indexer.settings import IndexerSettings
from services.search.settings import SearchSettings

README = (REPO_ROOT / "README.md").read_text()
CONFIGURATION = (REPO_ROOT / "docs" / "configuration.md").read_text()


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
    missing = [f"CBIR_{name.upper()}" for name in settings.model_fields
               if f"`CBIR_{name.upper()}`" not in CONFIGURATION]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_the_performance_table_is_what_the_result_files_give() -> None:
    report = load_bench_script("report")
    assert report.main(["--check", "--doc", str(REPO_ROOT / "docs" / "performance.md"),
                        "--results", str(REPO_ROOT / "bench" / "results")]) == 0, "run python bench/report.py"


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_is_short_and_every_link_between_the_documents_resolves() -> None:
    assert len(README.splitlines()) <= 250, "the README is read in a few minutes; the reference goes to docs/"
    documents = [REPO_ROOT / "README.md", REPO_ROOT / "CHANGELOG.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    broken = []
    for document in documents:
        for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = (document.parent / path).resolve() if path else document
            if not linked.exists() or (anchor and anchor not in heading_anchors(linked.read_text())):
                broken.append(f"{document.relative_to(REPO_ROOT)}: {target}")
    assert not broken, broken
