"""The evaluation report's tables: small numbers keep four significant digits."""

from __future__ import annotations


def test_report_cells_keep_four_significant_digits_below_a_tenth() -> None:
    from services.evaluation.report import _cell

    # MAP@100 just under the 0.0185 must not print as 0.0185.
    assert _cell(0.018478) == "0.01848"
    assert _cell(0.92516) == "0.9252"
    assert _cell(0.0) == "0.0000"
    assert _cell(None) == "n/a"
