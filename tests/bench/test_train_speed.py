"""bench/train_speed.py: `cbir train`'s own step timed on random images, printed as one JSON line."""

from __future__ import annotations

import json

import pytest
import torch
from bench_helpers import load_bench_script


def test_a_quick_run_prints_the_rate_and_the_epoch_it_implies(capsys: pytest.CaptureFixture[str]) -> None:
    load_bench_script("train_speed").main(["--batch-size", "4", "--steps", "1", "--warmup", "0",
                                           "--train-images", "400", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["device"].startswith("cpu (") and result["torch"] == torch.__version__
    assert result["batch_size"] == 4 and result["steps"] == 1 and result["images_per_second"] > 0
    assert result["epoch_seconds"] == pytest.approx(400 / result["images_per_second"], rel=0.02)

