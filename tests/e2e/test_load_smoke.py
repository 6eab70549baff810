"""A short load run against a real `cbir serve`: no errors, some throughput, bounded memory growth."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from bench_helpers import load_bench_script
from processes import stop_process

MAX_RSS_GROWTH = 100 * 2**20


@pytest.mark.slow
def test_short_load_run_has_no_errors_and_bounded_memory(served, mini_collection: Path) -> None:
    url, process, log = served
    bench = load_bench_script("load")
    result = bench.main(["--url", url, "--clients", "4", "--duration", "3", "--pid", str(process.pid),
                         "--images", str(mini_collection / "test")])
    assert result.errors == 0, result.error_kinds
    assert result.requests > 0 and result.qps > 0
    assert not math.isnan(result.percentile(99))
    assert result.rss_before and result.rss_after
    assert result.rss_growth < MAX_RSS_GROWTH, result.summary()
    stop_process(process)
    assert process.returncode == 0  # the lifespan ended: cbir takes the signal uvicorn raises again
    output = log.read_text()
    assert "stopped: every resource closed" in output and "Traceback" not in output
