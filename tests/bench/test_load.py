"""bench/load.py: it refuses to load anything but this machine."""

from __future__ import annotations

import pytest
from bench_helpers import load_bench_script


def test_bench_refuses_other_hosts() -> None:
    bench = load_bench_script("load")
    with pytest.raises(SystemExit, match="loopback"):
        bench.main(["--url", "http://example.com:8000", "--duration", "1"])
