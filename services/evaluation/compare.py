"""`cbir compare`: the original study's comparison of systems, reproduced with this repository's code.

    cbir compare                 render reports/comparison.{md,json} and the figures from the bundles
                                 present and the committed row results (reports/comparison/*.json),
                                 measuring a row whose bundle is present but not yet measured
    cbir compare --train         first retrain every row within the stated budgets, then measure, then render
    cbir compare --train --rows bovw,cnn   only those rows

Rows: the Bag-of-Visual-Words system (`cbir train-bovw`), the study's six deep models trained by
`cbir train --arch ... --time-budget-min B` with the same recipe and the same wall-clock budget, and
the shipped VGG-16 bundle. Each row is measured by `cbir evaluate` (the study's protocol: the test
images query the train images, MAP@100, P@100, mAP@ALL) plus accuracy and macro precision on train
and test from the same features.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_score

from services.common.errors import BundleError, ConfigError
from services.embedder.bundle import DEFAULT_BUNDLE_DIR, load_bundle
from services.evaluation import figures
from services.evaluation.cli import main as evaluate
from services.evaluation.features import embed_split, load_collection_split
from services.evaluation.report import write_json

logger = logging.getLogger("cbir.compare")

DEFAULT_BUDGET_MIN = 8.0


@dataclass(frozen=True)
class Row:
    """One system of the study's tables: how we build it and what the study measured."""

    key: str
    title: str
    study_title: str
    study_accuracy: float | None  # the study's test accuracy
    study_map_at_100: float | None = None
    arch: str | None = None  # a `cbir train --arch` backbone; None for BOVW and the shipped bundle


ROWS = (
    Row("bovw", "BOVW (best by CV)", "BOVW, logistic regression on HOG+SIFT", 0.56, 0.0019),
    Row("mlp", "MLP", "plain neural network", 0.55, arch="CifarMLP"),
    Row("cnn", "small CNN", "custom CNN", 0.67, arch="CifarCNN"),
    Row("alexnet", "AlexNet", "AlexNet", 0.84, arch="CifarAlexNet"),
    Row("vgg16", "VGG-16 (same budget)", "VGG-16", 0.85, 0.0088, arch="CifarVGG16"),
    Row("googlenet", "GoogLeNet (Inception v1)", "Inception v1", 0.81, arch="CifarGoogLeNet"),
    Row("resnet50", "ResNet-50", "ResNet-50", 0.85, arch="CifarResNet50"),
    Row("shipped", "VGG-16, shipped bundle", "VGG-16", 0.85, 0.0088),
)
ROW_KEYS = tuple(row.key for row in ROWS)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir compare", description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="retrain the rows first (minutes to hours on a CPU)")
    parser.add_argument("--rows", default=",".join(ROW_KEYS), help=f"comma-separated rows of: {', '.join(ROW_KEYS)}")
    parser.add_argument("--budget-min", type=float, default=DEFAULT_BUDGET_MIN,
                        help="with --train: minutes of training steps each deep model gets")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="collection root with train/ and test/ (default: CBIR_DATA_DIR, else data/cifar10, "
                        "else ../shared/cifar10)")
    parser.add_argument("--models-dir", type=Path, default=Path("models/comparison"),
                        help="where the rows' bundles are (one folder per row; the shipped one is CBIR_MODEL_DIR's "
                        "default)")
    parser.add_argument("--results-dir", type=Path, default=Path("reports/comparison"),
                        help="the rows' measured results (committed)")
    parser.add_argument("--output-dir", type=Path, default=Path("reports"), help="where comparison.md goes")
    parser.add_argument("--cache-dir", type=Path, default=Path("state/comparison"),
                        help="decoded images, features, checkpoints and the rows' evaluation reports")
    parser.add_argument("--train-args", default="",
                        help="extra options for every `cbir train` of a deep row (tests: '--limit-per-class 20')")
    parser.add_argument("--bovw-args", default="", help="extra options for `cbir train-bovw`")
    parser.add_argument("--evaluate-args", default="", help="extra options for every cbir evaluate")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    keys = [key for key in args.rows.split(",") if key]
    unknown = [key for key in keys if key not in ROW_KEYS]
    if unknown or not keys:
        raise ConfigError(f"--rows {args.rows!r}: name some of {', '.join(ROW_KEYS)}")
    rows = [row for row in ROWS if row.key in keys]
    if args.train:
        for row in rows:
            train_row(row, args)
    results = {}
    for row in ROWS:
        result = current_result(row, args, measure=row in rows)
        if result is not None:
            results[row.key] = result
    return render(results, args)


def bundle_dir(row: Row, args: argparse.Namespace) -> Path:
    return DEFAULT_BUNDLE_DIR if row.key == "shipped" else args.models_dir / row.key


def train_commands(row: Row, args: argparse.Namespace) -> list[str] | None:
    """The `cbir` command line that trains the row (None: the shipped bundle, trained once with its own recipe)."""
    extra = shlex.split(args.bovw_args if row.key == "bovw" else args.train_args)
    output = ["--output", str(bundle_dir(row, args))]
    if row.key == "bovw":
        return ["train-bovw", *output, "--cache-dir", str(args.cache_dir / "bovw"), "--quiet", *extra]
    if row.arch is None:
        return None
    return ["train", "--arch", row.arch, "--time-budget-min", f"{args.budget_min:g}", "--no-flip-tta", *output,
            "--checkpoint-dir", str(args.cache_dir / "train" / row.key), "--quiet", *extra]


def train_row(row: Row, args: argparse.Namespace) -> None:
    from services.training import get_args_parser as train_parser
    from services.training import train
    from services.training.bovw import get_args_parser as bovw_parser
    from services.training.bovw import train_bovw

    command = train_commands(row, args)
    if command is None:
        logger.info("%s: the shipped bundle is not retrained here (its recipe: docs/model.md, 'Training')", row.key)
        return
    logger.info("%s: cbir %s", row.key, shlex.join(command))
    if args.data_dir is not None:
        command += ["--data-dir", str(args.data_dir)]
    if command[0] == "train-bovw":
        train_bovw(bovw_parser().parse_args(command[1:]))
    else:
        train(train_parser().parse_args(command[1:]))


def current_result(row: Row, args: argparse.Namespace, *, measure: bool) -> dict[str, Any] | None:
    """The row's result: the committed one when it measured the bundle present (or no bundle is present),
    else a new measurement (when `measure`); None when there is neither."""
    path = args.results_dir / f"{row.key}.json"
    committed = json.loads(path.read_text()) if path.exists() else None
    try:
        bundle = load_bundle(bundle_dir(row, args))
    except BundleError:
        if committed is not None:
            committed["bundle_present"] = False
        return committed
    if committed is not None and committed["bundle_version"] == bundle.version:
        committed["bundle_present"] = True
        return committed
    if not measure:  # a row left out of --rows: its result is of another bundle than the one here
        return None if committed is None else {**committed, "bundle_present": False, "stale": True}
    result = measure_row(row, bundle, args)
    write_json(path, result)
    return {**result, "bundle_present": True}


def measure_row(row: Row, bundle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """`cbir evaluate` of the row's bundle, and accuracy and macro precision on both splits."""
    directory = bundle_dir(row, args)
    if directory.is_absolute() and directory.is_relative_to(Path.cwd()):  # the shipped bundle: as a user types it
        directory = directory.relative_to(Path.cwd())
    cache = args.cache_dir / "evaluation"
    command = ["--model-dir", str(directory), "--output-dir", str(args.cache_dir / "reports"), "--name", row.key,
               "--cache-dir", str(cache), "--quiet", *shlex.split(args.evaluate_args)]
    if args.data_dir is not None:
        command += ["--data-dir", str(args.data_dir)]
    logger.info("%s: cbir evaluate %s", row.key, shlex.join(command))
    evaluation = evaluate(command)
    config = evaluation["config"]
    root = Path(config["data_dir"])
    splits = {}
    for split, purpose, limit in (("train", "index", config["limit_per_class"]),
                                  ("test", "query", config["query_limit_per_class"])):
        images = load_collection_split(root, split, bundle.classes, preprocessing=bundle.preprocessing,
                                       cache_dir=cache, limit_per_class=limit)
        features = embed_split(bundle, images, purpose=purpose, cache_dir=cache)  # cached by cbir evaluate
        predicted = features.predicted
        splits[split] = {"accuracy": round(float(np.mean(predicted == images.labels)), 4),
                         "precision": round(float(precision_score(images.labels, predicted, average="macro",
                                                                  zero_division=0)), 4)}
    training = bundle.metadata.get("training", {})
    metrics = evaluation["metrics"]
    return {
        "row": row.key, "bundle_version": bundle.version, "family": bundle.family,
        "architecture": bundle.metadata["architecture"], "measured": datetime.now(UTC).isoformat(timespec="seconds"),
        "train_command": training.get("command"), "evaluate_command": "cbir evaluate " + shlex.join(command),
        "budget": training.get("budget"),
        "epochs": len(training.get("history", [])) or None,
        "train": splits["train"], "test": splits["test"],
        "retrieval": {key: metrics[key] for key in ("map_at_100", "P_100", "map_all", "queries", "documents")},
        "bovw": {key: training[key] for key in ("cells", "vocabulary_sweep", "vocabulary_size", "sift_keypoints",
                                               "served", "grids", "grid_images", "folds", "timings_s")}
        if bundle.family == "bovw" else None,
    }


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """reports/comparison.{json,md} and the figures, from the rows' results."""
    output = args.output_dir
    figure_paths = {}
    present = [row for row in ROWS if row.key in results]
    if present:
        figure_paths["bars"] = figures.comparison_bars(
            output / "figures" / "comparison.png", [row.title for row in present],
            ours_accuracy=[results[row.key]["test"]["accuracy"] for row in present],
            study_accuracy=[row.study_accuracy for row in present],
            ours_map=[results[row.key]["retrieval"]["map_at_100"] for row in present],
            study_map=[row.study_map_at_100 for row in present])
    bovw = (results.get("bovw") or {}).get("bovw")
    if bovw and bovw["vocabulary_sweep"]:
        figure_paths["vocabulary"] = figures.vocabulary_sweep(
            output / "figures" / "comparison-vocabulary.png",
            [r["words"] for r in bovw["vocabulary_sweep"]], [r["davies_bouldin"] for r in bovw["vocabulary_sweep"]],
            chosen=bovw["vocabulary_size"])
    summary = {"rows": [{**vars(row), "result": results.get(row.key)} for row in ROWS],
               "figures": {name: str(path.relative_to(output)) for name, path in figure_paths.items()}}
    write_json(output / "comparison.json", summary)
    (output / "comparison.md").write_text(markdown(results, summary["figures"], args))
    logger.info("report: %s", output / "comparison.md")
    return summary


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, dict[str, Any]], figure_paths: dict[str, str], args: argparse.Namespace) -> str:
    """reports/comparison.md: how the rows were trained and measured, the side-by-side table, the BOVW
    section (when its row has a result), and how each row was made."""
    lines = _introduction(results, args) + _side_by_side(results, figure_paths)
    bovw = (results.get("bovw") or {}).get("bovw")
    if bovw:
        lines += _bovw_section(bovw, figure_paths)
    lines += _provenance(results, args)
    return "\n".join(lines)


def _introduction(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """The title and the two paragraphs on the training budget and the retrieval protocol."""
    sizes = sorted({(r["retrieval"]["queries"], r["retrieval"]["documents"]) for r in results.values()})
    protocol = " or ".join(f"the {q:,} test images query the {d:,} train images" for q, d in sizes) or \
        "the test images query the train images"
    return [
        "# The study's comparison, reproduced",
        "",
        "Written by `cbir compare` (services/evaluation/compare.py) from the rows' results in "
        f"`{args.results_dir}/`; `cbir compare --train` retrains every row first. Every deep row but the shipped "
        "one is **budget-limited**: the same recipe (`cbir train`'s defaults without flip TTA: SGD Nesterov, "
        "one-cycle at 0.1, label smoothing 0.1, crop + flip augmentation, bf16, batch 256) and the same budget of "
        "training-step minutes each (the per-epoch test measurement not counted), so the slower networks see "
        "fewer epochs, as the column says; the shipped bundle was trained once with its own recipe (docs/model.md, "
        "'Training'). The study fine-tuned ImageNet-pretrained networks with only their classifiers trained; "
        "that mode (`cbir train --pretrained imagenet --freeze-pretrained`, for VGG-16, AlexNet, GoogLeNet and "
        "ResNet-50; it downloads torchvision's weights) could not run on this machine, which has no internet: "
        "every network here is trained from scratch at 32×32.",
        "",
        f"Retrieval is the study's protocol through `cbir evaluate`: {protocol}, exact cosine search on the "
        "search vector (PCA-reduced embedding, L2-normalised, with the "
        "predicted class's one-hot at weight 2, for BOVW the standardised fused descriptors in its place); "
        "MAP@100 is trec_eval's `map` on the run cut at 100 (ceiling 0.02), mAP@ALL ranks every train image. "
        "Precision is the macro average over the classes. The study's figures are those of its tables as "
        "quoted in issue 16; a dash where we have no figure of the study.",
    ]


def _side_by_side(results: dict[str, dict[str, Any]], figure_paths: dict[str, str]) -> list[str]:
    """The main table, one line per row of the study (ours beside the study's figures), and its chart."""
    lines = [
        "",
        "## Deep models and BOVW, side by side",
        "",
        "| model | study: model | study test acc | train acc | train prec | test acc | test prec | training "
        "| MAP@100 (study) | MAP@100 | P@100 | mAP@ALL |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        result = results.get(row.key)
        if result is None:
            lines.append(f"| {row.title} | {row.study_title} | {_pct(row.study_accuracy)} | not measured yet: "
                         f"`cbir compare --train --rows {row.key}` | | | | | {_num(row.study_map_at_100)} | | | |")
            continue
        lines.append(" | ".join([
            f"| {row.title}", row.study_title, _pct(row.study_accuracy), _pct(result["train"]["accuracy"]),
            _pct(result["train"]["precision"]), _pct(result["test"]["accuracy"]), _pct(result["test"]["precision"]),
            _training(result), _num(row.study_map_at_100), _num(result["retrieval"]["map_at_100"], 5),
            _num(result["retrieval"]["P_100"]), _num(result["retrieval"]["map_all"]) + " |"]))
    if "bars" in figure_paths:
        lines += ["", f"![test accuracy and MAP@100, ours beside the study's]({figure_paths['bars']})"]
    return lines


def _provenance(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """'How each row was made': each row's bundle, when it was measured, and the commands that made and
    measured it."""
    lines = ["", "## How each row was made", "", "| row | bundle | measured | train | evaluate |",
             "|---|---|---|---|---|"]
    for row in ROWS:
        result = results.get(row.key) or {}
        command = train_commands(row, args)
        train = result.get("train_command") or ("cbir " + shlex.join(command) if command else "")
        bundle = f"`{result['bundle_version']}`" if result else "—"
        if result.get("stale"):
            bundle += " (stale: the bundle here is another)"
        elif result and not result.get("bundle_present"):
            bundle += " (not here)"
        evaluate_command = f"`{result['evaluate_command']}`" if result else ""
        lines.append(f"| {row.key} | {bundle} | {result.get('measured', '—')[:10]} | `{train}` | {evaluate_command} |")
    lines += ["", "Bundles other than the shipped one live in `models/comparison/` and are not committed (tens of MB "
              "each); their results are, in the JSON files above, with their recipes.", ""]
    return lines


def _training(result: dict[str, Any]) -> str:
    budget = result.get("budget")
    if budget:
        return f"budget-limited: {budget['minutes']:g} min, {budget['epochs_reached']:.2f} epochs"
    if result["family"] == "bovw":
        return f"grid search on {result['bovw']['grid_images']:,} images, refit on all"
    return f"{result['epochs']} epochs (its own recipe)" if result.get("epochs") else "its own recipe"


def _bovw_section(bovw: dict[str, Any], figure_paths: dict[str, str]) -> list[str]:
    keypoints = bovw.get("sift_keypoints") or {}
    served = bovw["served"]
    lines = [
        "",
        "## BOVW: feature sets × classifiers",
        "",
        f"Grid search with stratified {bovw['folds']}-fold CV on {bovw['grid_images']:,} train images (the grids: "
        + "; ".join(f"{name} {grid}" for name, grid in bovw["grids"].items())
        + "), the best parameters refitted on all train images and measured on train and test. The served pair "
        f"(best CV accuracy): **{served['feature_set']} / {served['classifier']}**. The study's only per-cell "
        "figure we have is its winner, logistic regression on HOG+SIFT: 56% test accuracy.",
        "",
        "| feature set | classifier | dims | best parameters | CV acc | train acc | train prec | test acc "
        "| test prec | study test acc | seconds (grid + refit) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in bovw["cells"]:
        study = "56%" if (cell["feature_set"], cell["classifier"]) == ("hog+sift", "logreg") else "—"
        lines.append(f"| {cell['feature_set']} | {cell['classifier_name']} | {cell['dims']} | `{cell['best_params']}` "
                     f"| {_pct(cell['cv_accuracy'])} | {_pct(cell['train_accuracy'])} | {_pct(cell['train_precision'])}"
                     f" | {_pct(cell['test_accuracy'])} | {_pct(cell['test_precision'])} | {study} "
                     f"| {cell['grid_seconds']:.0f} + {cell['refit_seconds']:.0f} |")
    if bovw["vocabulary_sweep"]:
        lines += ["", "### The visual vocabulary", "",
                  f"MiniBatchKMeans on sampled dense-SIFT descriptors of the grid subset, each size scored by the "
                  f"Davies–Bouldin index (lower: tighter, better separated clusters); chosen: "
                  f"**{bovw['vocabulary_size']} words** (the study chose 400 the same way).", "",
                  "| words | Davies–Bouldin | inertia per descriptor | seconds |", "|---|---|---|---|"]
        lines += [f"| {r['words']}{' (chosen)' if r['chosen'] else ''} | {r['davies_bouldin']:.4f} "
                  f"| {r['inertia_per_descriptor']:,.0f} | {r['seconds']:.1f} |" for r in bovw["vocabulary_sweep"]]
        if "vocabulary" in figure_paths:
            lines += ["", f"![Davies–Bouldin index by vocabulary size]({figure_paths['vocabulary']})"]
    if keypoints:
        grid = keypoints["dense_grid"]
        lines += ["", f"SIFT's own detector on these 32×32 images ({keypoints['images']:,} of them): "
                  f"{_pct(keypoints['without_any'])} without any keypoint, a median of {keypoints['median']:g} "
                  f"(mean {keypoints['mean']:g}) — few, and a different number each image — so the descriptors are "
                  f"computed densely: {grid['per_image']} keypoints of size {grid['size']:g} on a {grid['step']}-pixel "
                  "grid, the same for every image."]
    return lines
