"""bench/duplicates_calibration.py on a few CIFAR-10 images: the copies it makes, and the report it writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duplicates_calibration
import numpy as np
from PIL import Image

from services.search.duplicates import DEFAULT_THRESHOLD


def test_the_copies_are_what_they_say(cifar10_dir: Path) -> None:
    data = (cifar10_dir / "test" / "cat" / "0000.jpg").read_bytes()
    made = duplicates_calibration.variants(data)
    assert list(made) == list(duplicates_calibration.KINDS) and made["original"] == data
    pixels = {kind: np.asarray(Image.open(io.BytesIO(made[kind])).convert("RGB"), dtype=np.int16) for kind in made}
    assert Image.open(io.BytesIO(made["jpeg"])).format == "JPEG"
    assert np.array_equal(pixels["mirror"], pixels["original"][:, ::-1])
    assert np.array_equal(pixels["shift"][:, 1:], pixels["original"][:, :-1])
    assert pixels["bright"].mean() > pixels["original"].mean()


def test_a_quick_run_writes_the_report(tmp_path: Path, cifar10_dir: Path, tiny_bundle_dir: Path) -> None:
    assert duplicates_calibration.main(["--quick", "--model-dir", str(tiny_bundle_dir), "--cost", "200",
                                        "--output-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "duplicates.json").read_text())
    assert result["default_threshold"] == DEFAULT_THRESHOLD and result["per_class"] == 5
    held = result["held_out"]
    assert held["originals"] == 50 and held["signature"]["positive_pairs"] == 50 * 10  # C(5, 2) per original
    assert 0 <= held["at_threshold"]["precision"] <= 1 and set(held["recall_by_kind"]) == {
        "jpeg", "resize", "shift", "bright", "mirror"}
    assert set(result["vectors"]) == {"originals", "signature", "vector_visual", "vector_fused"}
    assert result["cost"]["images"] == 200 and result["cost"]["upload_check_ms"] > 0
    report = (tmp_path / "duplicates.md").read_text()
    assert f"**{DEFAULT_THRESHOLD}**" in report and "| shift |" in report
