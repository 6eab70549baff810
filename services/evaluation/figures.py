"""The report's figures, drawn with matplotlib's object API (no pyplot state, Agg output).

Sizes are kept small (a few hundred KB in all) because the figures are committed with the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

DPI = 80
RELEVANT, IRRELEVANT = "#1a9850", "#d73027"


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def precision_recall(path: Path, recall: np.ndarray, precision: np.ndarray, *, title: str) -> Path:
    """Mean interpolated precision at each recall level, over the full ranking."""
    figure = Figure(figsize=(5, 4))
    axes = figure.add_subplot()
    axes.plot(recall, precision, color="#2c7bb6", linewidth=2)
    axes.set(xlabel="recall", ylabel="interpolated precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def per_class_ap(path: Path, classes: list[str], ap_at_100: np.ndarray, ap_all: np.ndarray | None,
                 *, ceiling: float, study: float | None = None) -> Path:
    """Per-class MAP@100 (trec, left axis, with its ceiling and the study's overall MAP@100 when
    comparable) and mAP@ALL (right axis), one bar pair per class."""
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    x = np.arange(len(classes))
    axes.bar(x - 0.2, ap_at_100, width=0.4, color="#2c7bb6", label="MAP@100 (trec_eval)")
    axes.axhline(ceiling, color="#555555", linestyle="--", linewidth=1, label=f"MAP@100 ceiling {ceiling:.3g}")
    if study is not None:
        axes.axhline(study, color="#d73027", linestyle=":", linewidth=1.5, label=f"study's MAP@100 {study:g}")
    axes.set(ylabel="MAP@100", ylim=(0, ceiling * 1.1), xticks=x)
    axes.set_xticklabels(classes, rotation=30, ha="right")
    handles, labels = axes.get_legend_handles_labels()
    if ap_all is not None:
        right = axes.twinx()
        right.bar(x + 0.2, ap_all, width=0.4, color="#fdae61", label="mAP@ALL")
        right.set(ylabel="mAP@ALL", ylim=(0, 1.1))
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axes.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, fontsize=8, frameon=False)
    axes.set_title("Average precision per query class")
    return _save(figure, path)


def confusion(path: Path, matrix: np.ndarray, classes: list[str]) -> Path:
    """Row-normalised confusion matrix with the counts written in."""
    figure = Figure(figsize=(6, 5.2))
    axes = figure.add_subplot()
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(classes))
    axes.set(xticks=ticks, yticks=ticks, xlabel="predicted class", ylabel="true class", title="Confusion matrix")
    axes.set_xticklabels(classes, rotation=45, ha="right")
    axes.set_yticklabels(classes)
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(col, row, str(count), ha="center", va="center", fontsize=6,
                  color="white" if rates[row, col] > 0.5 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    return _save(figure, path)


def example_queries(path: Path, queries: np.ndarray, query_labels: list[str], results: np.ndarray,
                    relevant: np.ndarray) -> Path:
    """One row per query: the query image, then its top results framed green (same class) or red.

    `queries` is `(Q, 32, 32, 3)`, `results` `(Q, n, 32, 32, 3)`, `relevant` `(Q, n)` bool.
    """
    rows, columns = results.shape[0], results.shape[1] + 1
    figure = Figure(figsize=(columns * 0.8 + 0.8, rows * 0.8))
    grid = figure.subplots(rows, columns, squeeze=False)
    for row in range(rows):
        _show(grid[row, 0], queries[row], "#333333")
        grid[row, 0].set_ylabel(query_labels[row], rotation=0, ha="right", va="center", fontsize=7)
        for col in range(1, columns):
            _show(grid[row, col], results[row, col - 1], RELEVANT if relevant[row, col - 1] else IRRELEVANT)
            if row == 0:
                grid[row, col].set_title(str(col), fontsize=7)
    grid[0, 0].set_title("query", fontsize=7)
    figure.suptitle("Example queries and their top results (green: same class as the query)", fontsize=9)
    return _save(figure, path)


def _show(axes: Axes, image: np.ndarray, frame: str) -> None:
    axes.imshow(image, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(frame)
        spine.set_linewidth(2.5)


def comparison_bars(path: Path, titles: list[str], *, ours_accuracy: list[float], study_accuracy: list[float | None],
                    ours_map: list[float], study_map: list[float | None]) -> Path:
    """`cbir compare`'s chart: test accuracy and MAP@100 per row, ours beside the study's (where it has one)."""
    figure = Figure(figsize=(9, 3.8))
    x = np.arange(len(titles))
    for index, (ours, study, label) in enumerate(((ours_accuracy, study_accuracy, "test accuracy"),
                                                  (ours_map, study_map, "MAP@100"))):
        axes = figure.add_subplot(1, 2, index + 1)
        axes.bar(x - 0.2, ours, width=0.4, color="#2c7bb6", label="cbir")
        axes.bar(x + 0.2, [np.nan if s is None else s for s in study], width=0.4, color="#fdae61", label="study")
        axes.set(title=label, xticks=x)
        axes.set_xticklabels(titles, rotation=35, ha="right", fontsize=8)
        axes.grid(axis="y", alpha=0.3)
        if index == 0:
            axes.set_ylim(0, 1)
            axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    return _save(figure, path)


def vocabulary_sweep(path: Path, words: list[int], davies_bouldin: list[float], *, chosen: int) -> Path:
    """The Davies–Bouldin index of each visual vocabulary size, the chosen one marked."""
    figure = Figure(figsize=(5, 3.2))
    axes = figure.add_subplot()
    axes.plot(words, davies_bouldin, marker="o", color="#2c7bb6")
    axes.axvline(chosen, color="#d73027", linestyle=":", label=f"chosen: {chosen} words")
    axes.set(xlabel="visual words (k-means clusters)", ylabel="Davies–Bouldin index (lower is better)",
             title="Vocabulary sweep")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)
