"""bench/forward.py: a quick run on the tiny bundle writes each batch's rows, their ratios to the yardstick."""

from __future__ import annotations

from pathlib import Path

import benchlib
import pytest
from bench_helpers import load_bench_script, read_result


def test_quick_run_writes_each_batch_and_mode(quick_args: list[str], tmp_path: Path) -> None:
    load_bench_script("forward").main([*quick_args, "--seconds", "0.05"])
    result = read_result(tmp_path / "results", "forward")
    assert result["name"] == "forward" and result["busy"] in (True, False) and result["goals"] == []
    assert result["command"] == " ".join(["python bench/forward.py", *quick_args, "--seconds", "0.05"])
    assert result["settings"]["batches"] == [1, 16] and result["settings"]["modes"] == ["bf16", "fp32"]
    rows = {row["name"]: row for row in result["figures"]}
    for batch in (1, 16):
        stick = rows[f"cpu eager bf16, batch {batch} (yardstick)"]
        fp32 = rows[f"cpu eager fp32, batch {batch}"]
        assert stick["value"] > 0 and "ratio" not in stick
        assert fp32["yardstick"]["value"] == stick["value"] and fp32["yardstick"]["batch"] == batch
        assert fp32["ratio"] == pytest.approx(fp32["value"] / stick["value"], rel=1e-3)
    yardsticks = {(s["batch"], s["mode"]) for s in result["yardsticks"]}
    assert yardsticks == {(1, "eager bf16"), (16, "eager bf16")}


def test_a_busy_machine_writes_nothing(quick_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchlib, "load_average", lambda: 4.0)
    with pytest.raises(SystemExit) as refused:
        load_bench_script("forward").main([arg for arg in quick_args if arg != "--allow-busy"])
    assert refused.value.code == 3 and not (tmp_path / "results").exists()


def test_unknown_modes_are_named(quick_args: list[str]) -> None:
    with pytest.raises(SystemExit, match="int8"):
        load_bench_script("forward").main([*quick_args, "--modes", "bf16,int8"])


@pytest.mark.slow
def test_compiled_rows_compare_with_the_eager_forward(quick_args: list[str], tmp_path: Path) -> None:
    load_bench_script("forward").main([*quick_args, "--seconds", "0.05", "--batches", "2", "--modes", "compiled"])
    rows = {row["name"]: row for row in read_result(tmp_path / "results", "forward")["figures"]}
    compiled, stick = rows["cpu compiled bf16, batch 2"], rows["cpu eager bf16, batch 2 (yardstick)"]
    assert compiled["ratio"] == pytest.approx(compiled["value"] / stick["value"], rel=1e-3)
