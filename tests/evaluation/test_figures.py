"""The report's figures (services/evaluation/figures.py): PNGs of their stated size at the report's DPI, small
enough to commit, written where asked; the example-query grid frames each result by its relevance."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.evaluation import figures
from services.evaluation.figures import DPI, IRRELEVANT, RELEVANT


def pixels_of(path: Path, colour: str) -> int:
    """How many pixels of the PNG at `path` are exactly `colour` ('#rrggbb')."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int((np.asarray(Image.open(path).convert("RGB")) == rgb).all(axis=2).sum())


def queries(rows: int, results: int) -> tuple[np.ndarray, np.ndarray]:
    """Black query images and their black results, 32x32."""
    return np.zeros((rows, 32, 32, 3), np.uint8), np.zeros((rows, results, 32, 32, 3), np.uint8)


# Each figure, drawn from small made-up numbers, and its size in inches.
FIGURES: dict[str, tuple[Callable[[Path], Path], tuple[float, float]]] = {
    "precision_recall": (lambda path: figures.precision_recall(
        path, np.linspace(0, 1, 11), np.linspace(1, 0.2, 11), title="PR"), (5, 4)),
    "per_class_ap": (lambda path: figures.per_class_ap(
        path, ["cat", "dog", "ship"], np.array([0.01, 0.02, 0.015]), np.array([0.5, 0.6, 0.7]), ceiling=0.02,
        study=0.0088), (8, 3.6)),
    "confusion": (lambda path: figures.confusion(path, np.array([[3, 1], [0, 4]]), ["cat", "dog"]), (6, 5.2)),
    "example_queries": (lambda path: figures.example_queries(
        path, *queries(1, 4)[:1], ["cat"], queries(1, 4)[1], np.array([[True, False, True, True]])), (4.8, 0.8)),
    "comparison_bars": (lambda path: figures.comparison_bars(
        path, ["BOVW", "CNN"], ours_accuracy=[0.5, 0.6], study_accuracy=[0.56, None], ours_map=[0.001, 0.002],
        study_map=[None, 0.0088]), (9, 3.8)),
    "vocabulary_sweep": (lambda path: figures.vocabulary_sweep(path, [8, 16, 24], [2.0, 1.5, 1.7], chosen=16),
                         (5, 3.2)),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_each_figure_is_a_small_png_of_its_size_at_the_reports_dpi(name: str, tmp_path: Path) -> None:
    draw, (width, height) = FIGURES[name]
    path = draw(tmp_path / "figures" / f"{name}.png")  # a folder that does not exist yet
    assert path == tmp_path / "figures" / f"{name}.png"
    image = Image.open(path)
    assert image.format == "PNG"
    # `bbox_inches="tight"` trims the margins and makes room for labels and legends outside the axes.
    assert 0.85 * width * DPI <= image.width <= width * DPI
    assert 0.85 * height * DPI <= image.height <= 1.3 * height * DPI
    assert path.stat().st_size < 60_000  # committed with the report


def test_example_results_are_framed_green_when_relevant_and_red_when_not(tmp_path: Path) -> None:
    images, results = queries(1, 4)
    mixed = figures.example_queries(tmp_path / "mixed.png", images, ["cat"], results,
                                    np.array([[True, False, True, True]]))
    green, red = pixels_of(mixed, RELEVANT), pixels_of(mixed, IRRELEVANT)
    assert red > 0 and green == pytest.approx(3 * red, rel=0.1)  # three frames of one colour, one of the other

    images, results = queries(3, 4)
    relevant = figures.example_queries(tmp_path / "relevant.png", images, ["cat", "dog", "ship"], results,
                                       np.ones((3, 4), dtype=bool))
    assert pixels_of(relevant, IRRELEVANT) == 0
    assert pixels_of(relevant, RELEVANT) > 3 * green  # twelve green frames where there were three
    assert Image.open(relevant).height > 2 * Image.open(mixed).height


def test_the_query_and_its_results_are_drawn_as_solid_squares_left_to_right(tmp_path: Path) -> None:
    images, results = queries(1, 2)
    images[0] = (0, 0, 255)  # a blue query
    results[0, 1] = (255, 255, 0)  # a yellow second result
    path = figures.example_queries(tmp_path / "q.png", images, ["cat"], results, np.array([[True, True]]))
    pixels = np.asarray(Image.open(path).convert("RGB"))
    boxes = []
    for rgb in ((0, 0, 255), (255, 255, 0)):
        ys, xs = np.nonzero((pixels == rgb).all(axis=2))
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert len(ys) == height * width and abs(height - width) <= 1  # one square, nearest-neighbour: no blur
        boxes.append((xs.min(), height * width))
    (blue_left, blue_area), (yellow_left, yellow_area) = boxes
    assert blue_left < yellow_left and blue_area == yellow_area > 32 * 32
