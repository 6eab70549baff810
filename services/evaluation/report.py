"""The evaluation's outputs: `evaluation.json` (everything) and `evaluation.md` (for people)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The original study: ImageNet VGG-16, softmax retrained on CIFAR-10, trec_eval `map` on a 100-deep run.
STUDY = {"accuracy": 0.85, "map_at_100": 0.0088, "map_at_100_ceiling": 100 / 5000}
# Within this fraction of the best variant, a default counts as supported by an ablation.
SUPPORT_TOLERANCE = 0.01


def write_json(path: Path, result: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of `rows`, one column per `(key, header)`; floats to 4 decimals."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        # Four significant digits below 0.1: MAP@100 lives under its 0.02 ceiling, and 0.01848 shown as
        # "0.0185" would read as a target met.
        return f"{value:.4f}" if value == 0 or abs(value) >= 0.1 else f"{value:.4g}"
    return str(value)


def headline_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """This run next to the study, metric by metric."""
    ceiling = metrics["map_at_100_ceiling"]
    return [
        {"metric": "classification accuracy", "study": STUDY["accuracy"], "cbir": metrics["accuracy"]},
        {"metric": "MAP@100 (trec_eval `map`, run cut at 100)", "study": STUDY["map_at_100"],
         "cbir": metrics["map_at_100"]},
        {"metric": f"MAP@100 as a share of its ceiling ({ceiling:.4g}; the study's 0.02)",
         "study": STUDY["map_at_100"] / STUDY["map_at_100_ceiling"],
         "cbir": metrics["map_at_100"] / ceiling if ceiling else None},
        {"metric": "P@10", "study": None, "cbir": metrics["P_10"]},
        {"metric": "P@100", "study": None, "cbir": metrics["P_100"]},
        {"metric": "mAP@100, normalised by relevant retrieved", "study": None,
         "cbir": metrics["map_at_100_normalised"]},
        {"metric": "mAP@ALL (full ranking)", "study": None, "cbir": metrics.get("map_all")},
    ]


def verdict(rows: Sequence[dict[str, Any]], *, key: str, is_default: dict[str, Any]) -> str:
    """One sentence: does this table support the default, or which variant beats it (by `key`)?"""
    metric = dict(METRIC_COLUMNS)[key]
    best = max(rows, key=lambda row: row[key])
    default = next((row for row in rows if all(row[k] == v for k, v in is_default.items())), None)
    if default is None:
        return f"By {metric}, the best is {best['variant']} ({_cell(best[key])})."
    if default[key] >= best[key] * (1 - SUPPORT_TOLERANCE):
        return (f"By {metric}, this supports the default {default['variant']} ({_cell(default[key])}; "
                f"best {best['variant']}, {_cell(best[key])}).")
    return (f"By {metric}, this does not support the default {default['variant']} ({_cell(default[key])}): "
            f"{best['variant']} reaches {_cell(best[key])}.")


METRIC_COLUMNS = (("map", "MAP@100 (trec)"), ("map_normalised", "mAP@100 norm."), ("P_10", "P@10"),
                  ("P_100", "P@100"), ("map_all", "mAP@ALL"))
ABLATION_TABLES = (
    ("fusion", "Embedding only vs fused with the predicted class's one-hot"),
    ("onehot_weight", "One-hot weight (PCA dims at the default)"),
    ("pca_dims_fused", "PCA dims, fused (one-hot weight at the default)"),
    ("pca_dims_embedding_only", "PCA dims, embedding only (w = 0)"),
)


def write_markdown(path: Path, result: dict[str, Any]) -> Path:
    """The human-readable report next to its figures (paths in `result["figures"]` are relative to it)."""
    sections = [_summary_section(result), _protocol_section(result), _figures_section(result),
                _per_class_section(result)]
    if result.get("ablations"):
        sections.append(_ablation_section(result["ablations"]))
    sections.append(_timings_section(result))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(sections) + "\n")
    return path


def _summary_section(result: dict[str, Any]) -> str:
    config, metrics = result["config"], result["metrics"]
    lines = [
        "# Retrieval evaluation",
        f"`{config['command']}` — {config['finished']}, {config['mode_description']}.",
        f"Model bundle `{config.get('bundle_version') or 'n/a'}`, vectors `{config.get('model_version') or 'n/a'}`; "
        f"{metrics['queries']:,} test queries against {metrics['documents']:,} train images, top {config['k']}.",
        "## Compared with the original study",
        "The study: ImageNet VGG-16 with its softmax retrained, 85% accuracy, MAP@100 = 0.0088 (trec_eval `map` on "
        "a 100-deep run, every one of the 5,000 same-class train images relevant, so at most 100 / 5,000 = 0.02).",
        table(headline_rows(metrics), (("metric", "metric"), ("study", "study"), ("cbir", "cbir"))),
    ]
    weight = config.get("onehot_weight")
    if weight is not None and weight > 2 ** 0.5:
        lines.append(
            f"With a one-hot weight of {weight:g} (> √2) every image of the predicted class outranks every other, "
            f"so retrieval follows classification: P@100 = {metrics['P_100']:.4f} next to an accuracy of "
            f"{metrics['accuracy']:.4f}, and the embedding only orders images within the predicted class.")
    return "\n\n".join(lines)


def _protocol_section(result: dict[str, Any]) -> str:
    metrics, files = result["metrics"], result["files"]
    agreement = ("agree to within {:.1e}".format(metrics["numpy_vs_trec_eval_max_diff"])
                 if metrics.get("numpy_vs_trec_eval_max_diff") is not None else "were not compared")
    return "## Protocol\n\n" + "\n".join([
        "- **Relevance**: a train image is relevant to a test query when it has the query's class "
        f"(R = {metrics['relevant_per_query']:g} per query on average); the query's own prediction plays no part.",
        "- **MAP@100** is trec_eval's `map` (via pytrec_eval, trec_eval's own C code) on the run cut at 100, "
        "i.e. Σ precision at each relevant hit / R, the study's number; `map_cut_100` is identical "
        f"({metrics['map_cut_100']:.6f}). Its ceiling is k / R = {metrics['map_at_100_ceiling']:.4g}.",
        "- **mAP@100 normalised** divides the same sum by the relevant images retrieved in the top 100 "
        "(the deep-hashing literature's mAP@k); **mAP@ALL** ranks all train images for every query.",
        f"- **P@k**: trec_eval's `P_10`, `P_100`. numpy re-implementations used for the ablations {agreement} "
        "with trec_eval on this run.",
        f"- **Files**: the run is `{files['run']}` (TREC format) in the system's order, with score k − position: "
        "trec_eval re-sorts by a 32-bit score, which would swap cosines closer than ~1e-7. Qrels would be 50M lines "
        "for CIFAR-10, so by "
        f"default they are written compactly as `{files['labels']}` (`id<TAB>class`; relevant = same class) — "
        "`--write-qrels` writes the full TREC qrels. Neither is committed.",
    ])


def _figures_section(result: dict[str, Any]) -> str:
    figures = result["figures"]
    titles = {"precision_recall": "Precision–recall (full ranking, interpolated)",
              "per_class_ap": "Average precision per class", "confusion": "Confusion matrix",
              "examples": "Example queries"}
    parts = ["## Figures"]
    parts += [f"### {titles[name]}\n\n![{titles[name]}]({figures[name]})" for name in titles if name in figures]
    return "\n\n".join(parts)


def _per_class_section(result: dict[str, Any]) -> str:
    rows = [{"class": name, **values} for name, values in result["per_class"].items()]
    columns = (("class", "class"), ("queries", "queries"), ("accuracy", "accuracy"), ("map", "MAP@100 (trec)"),
               ("P_100", "P@100"), ("map_all", "mAP@ALL"))
    return "## Per class\n\n" + table(rows, columns)


def _ablation_section(ablations: dict[str, Any]) -> str:
    defaults, tables = ablations["defaults"], ablations["tables"]
    default_w, default_d = defaults["onehot_weight"], defaults["pca_dims"]
    parts = ["## Ablations",
             f"Exact search over the same raw embeddings, vectors built by the service's builder; defaults in "
             f"force: PCA {default_d}, one-hot weight {default_w:g}. Numpy metrics (checked against trec_eval)."]
    columns = (("variant", "vectors"), ("dims", "dims"), *METRIC_COLUMNS)
    for name, title in ABLATION_TABLES:
        rows = tables[name]
        parts += [f"### {title}", table(rows, columns)]
        for key in ("map", "map_all"):
            parts.append(verdict(rows, key=key, is_default={"pca_dims": default_d, "onehot_weight": default_w}))
    if "index_views" in tables:
        served, mirrored = tables["index_views"][1], tables["index_views"][0]
        parts += ["### Index-side views (queries: image + mirror)",
                  "The indexed images embedded with one view halve indexing's forward passes; the queries keep "
                  "the image and its mirror. The vectors live in the same space, so either index serves the same "
                  "queries.",
                  table(tables["index_views"], columns),
                  f"Single views change MAP@100 by {served['map'] - mirrored['map']:+.6f} and mAP@ALL by "
                  f"{served['map_all'] - mirrored['map_all']:+.5f}."]
    search = tables["search"]
    parts += ["### Exact vs approximate search (HNSW)",
              "Single-query latency over the default vectors on this machine; recall@k against exact search.",
              table(search, (("search", "index"), ("recall_at_k", "recall@k"), ("map", "MAP@100 (trec)"),
                             ("P_100", "P@100"), ("latency_ms_p50", "p50 ms"), ("latency_ms_p95", "p95 ms"),
                             ("build_s", "build s")))]
    return "\n\n".join(parts)


def _timings_section(result: dict[str, Any]) -> str:
    rows = [{"stage": stage, "seconds": f"{seconds:.1f}"} for stage, seconds in result["timings"].items()]
    reproduce = result["config"].get("reproduce", [])
    return "\n\n".join(["## Timings", table(rows, (("stage", "stage"), ("seconds", "seconds"))),
                        "## Reproduce", "```\n" + "\n".join(reproduce) + "\n```"])


def console_summary(result: dict[str, Any]) -> list[str]:
    """The headline table as plain lines, for the log."""
    lines = [f"{'metric':64} {'study':>8} {'cbir':>8}"]
    for row in headline_rows(result["metrics"]):
        lines.append(f"{row['metric'][:64]:64} {_cell(row['study']):>8} {_cell(row['cbir']):>8}")
    return lines
