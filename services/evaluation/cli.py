"""`cbir evaluate`: the original study's protocol (test images query the train images, top 100).

    cbir evaluate                          exact FAISS search over vectors built here (fast)
    cbir evaluate --ablations              … plus one-hot weight, PCA dims, fusion, HNSW tables
    cbir evaluate --against-store          query the index in CBIR_STATE_DIR (FaissStore.search)
    cbir evaluate --url http://host:8000   query a running search API (the real path)

Writes reports/evaluation.{json,md}, reports/figures/*.png and reports/trec/ (run, compact qrels).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from services.common.collection import find_data_dir, list_classes
from services.common.errors import BundleError
from services.common.settings import StoreSettings
from services.embedder.bundle import DEFAULT_BUNDLE_DIR, Bundle, load_bundle
from services.embedder.inference import Preprocessing
from services.embedder.runtime import Embedder
from services.evaluation import figures
from services.evaluation.ablations import AblationData, run_ablations
from services.evaluation.features import Features, Split, check_classes, embed_split, fuse, load_collection_split
from services.evaluation.metrics import (
    FullRanking,
    confusion_matrix,
    full_ranking,
    per_class_mean,
    relevance,
    relevant_counts,
    retrieval_metrics,
    trec_eval,
)
from services.evaluation.report import STUDY, console_summary, write_json, write_markdown
from services.evaluation.runs import (
    ApiOptions,
    Ranking,
    api_model_version,
    document_rows,
    exact_search,
    search_api,
    search_store,
    write_labels,
    write_qrels,
    write_run,
)
from services.evaluation.settings import EvaluationSettings
from services.indexer.serving import served_index

logger = logging.getLogger("cbir.evaluate")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir evaluate", description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="model bundle (default: CBIR_MODEL_DIR, else models/vgg16-cifar10)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="collection root with train/ and test/ (default: CBIR_DATA_DIR, else data/cifar10, "
                        "else ../shared/cifar10)")
    parser.add_argument("--output-dir", type=Path, default=Path("reports"), help="where the report is written")
    parser.add_argument("--name", default="evaluation", help="base name of the report files")
    parser.add_argument("--cache-dir", type=Path, default=Path("state/evaluation"),
                        help="decoded images and embeddings are cached here")
    parser.add_argument("-k", "--k", type=int, default=100, help="depth of the run (the study: 100)")
    parser.add_argument("--pca-dims", type=int, default=None, help="PCA dims of the vectors (default: the bundle's)")
    parser.add_argument("--onehot-weight", type=float, default=None,
                        help="one-hot weight of the vectors (default: the bundle's)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--against-store", action="store_true",
                        help="search the indexed embedded store in CBIR_STATE_DIR instead of local vectors")
    source.add_argument("--url", default=None, help="search a running search API at this base URL")
    parser.add_argument("--state-dir", type=Path, default=None, help="with --against-store (default: CBIR_STATE_DIR)")
    parser.add_argument("--api-key", default=None, help="X-API-Key for --url (default: CBIR_EVAL_API_KEY)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight with --url")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="timeout of one request with --url")
    parser.add_argument("--ablations", action="store_true",
                        help="also measure one-hot weights, PCA dims, fusion and exact vs HNSW search")
    parser.add_argument("--write-qrels", action="store_true",
                        help="write full TREC qrels (50M lines for CIFAR-10) besides the compact labels file")
    parser.add_argument("--limit-per-class", type=int, default=None, help="at most this many train images per class")
    parser.add_argument("--query-limit-per-class", type=int, default=None,
                        help="at most this many test queries per class")
    parser.add_argument("--examples", type=int, default=8, help="example queries drawn in the report")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


@dataclass
class Collection:
    """The two splits, and the model's features for them when a bundle is loaded."""

    root: Path
    classes: list[str]
    train: Split
    test: Split
    bundle: Bundle | None = None
    train_features: Features | None = None
    test_features: Features | None = None


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


def main(argv: list[str] | None = None, *, settings: EvaluationSettings | None = None) -> dict[str, Any]:
    """Run the evaluation described by `argv`; returns what `evaluation.json` holds. `settings`
    (default: read from `CBIR_*` and `.env`) fill in the options `argv` leaves out."""
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    settings = settings or EvaluationSettings.load()
    _apply_settings(args, settings)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    collection = _load(args, timings)
    pca_dims, onehot_weight = _vector_settings(args, collection.bundle)
    ranking, model_version, local = _rank(args, collection, timings, pca_dims, onehot_weight)
    result, relevant, full = _score(collection, ranking, local, timings)
    if args.ablations:
        with _timed(timings, "ablations"):
            result["ablations"] = run_ablations(_ablation_data(collection, args), pca_dims=pca_dims,
                                                onehot_weight=onehot_weight)
    result["config"] = _config(args, argv, collection, model_version, pca_dims, onehot_weight, settings)
    with _timed(timings, "report"):
        _write_outputs(args, collection, ranking, relevant, full, result)
    timings["total"] = time.perf_counter() - started
    result["timings"] = {stage: round(seconds, 2) for stage, seconds in timings.items()}
    write_json(args.output_dir / f"{args.name}.json", result)
    write_markdown(args.output_dir / f"{args.name}.md", result)
    for line in console_summary(result):
        logger.info("%s", line)
    logger.info("report: %s", args.output_dir / f"{args.name}.md")
    return result


def _apply_settings(args: argparse.Namespace, settings: EvaluationSettings) -> None:
    """Options left out of the command line take the settings' values."""
    args.model_dir = args.model_dir or settings.model_dir
    args.data_dir = args.data_dir or settings.data_dir
    args.state_dir = args.state_dir or settings.state_dir
    if args.api_key is None and settings.eval_api_key is not None:
        args.api_key = settings.eval_api_key.get_secret_value()


def _load(args: argparse.Namespace, timings: dict[str, float]) -> Collection:
    """The collection decoded (cached) as the bundle says, and the bundle, which `--url` alone can do
    without (then the images are decoded as every bundle so far wants them, for the figures only)."""
    root = find_data_dir(args.data_dir)
    bundle = _load_bundle(args)
    classes = bundle.classes if bundle is not None else list_classes(root, "train")
    preprocessing = bundle.preprocessing if bundle is not None else Preprocessing()
    check_classes(root, classes)
    with _timed(timings, "decode"):
        train = load_collection_split(root, "train", classes, preprocessing=preprocessing, cache_dir=args.cache_dir,
                                      limit_per_class=args.limit_per_class)
        test = load_collection_split(root, "test", classes, preprocessing=preprocessing, cache_dir=args.cache_dir,
                                     limit_per_class=args.query_limit_per_class)
    logger.info("%s: %d train images, %d test queries, %d classes", root, len(train), len(test), len(classes))
    return Collection(root=root, classes=classes, train=train, test=test, bundle=bundle)


def _load_bundle(args: argparse.Namespace) -> Bundle | None:
    path = args.model_dir or DEFAULT_BUNDLE_DIR
    try:
        return load_bundle(path)
    except BundleError as exc:
        if args.url and not args.ablations:
            logger.warning("no local model (%s): mAP@ALL and the precision–recall curve are skipped", exc.message)
            return None
        raise


def _vector_settings(args: argparse.Namespace, bundle: Bundle | None) -> tuple[int, float]:
    defaults = bundle.vector_defaults if bundle is not None else {"pca_dims": 0, "onehot_weight": 0.0}
    pca_dims = int(args.pca_dims or defaults["pca_dims"])
    onehot_weight = float(defaults["onehot_weight"] if args.onehot_weight is None else args.onehot_weight)
    return pca_dims, onehot_weight


@dataclass
class LocalVectors:
    """Search vectors built here for the test queries and the train documents."""

    queries: np.ndarray
    documents: np.ndarray


def _rank(args: argparse.Namespace, collection: Collection, timings: dict[str, float], pca_dims: int,
          onehot_weight: float) -> tuple[Ranking, str | None, LocalVectors | None]:
    """The run of the chosen mode, the model version behind it, and the local vectors when they are
    the same as the searched ones (then mAP@ALL can rank everything)."""
    bundle = collection.bundle
    local_version = None
    if bundle is not None:
        local_version = Embedder(bundle, device=args.device, pca_dims=pca_dims,
                                 onehot_weight=onehot_weight).model_version
    options = ApiOptions(concurrency=args.concurrency, timeout_s=args.timeout_s, api_key=args.api_key)
    served = asyncio.run(api_model_version(args.url, options=options)) if args.url else local_version
    if args.url and local_version not in (None, served):
        logger.warning("the API serves %s, the local model builds %s: mAP@ALL and the precision–recall curve "
                       "are skipped", served, local_version)
    comparable = bundle is not None and served == local_version
    if comparable or args.ablations:
        _embed(args, collection, timings)
    vectors = None
    if comparable:
        features = (collection.test_features, collection.train_features)
        vectors = LocalVectors(*(fuse(bundle, f, pca_dims=pca_dims, onehot_weight=onehot_weight) for f in features))
    with _timed(timings, "search"):
        ranking = _search(args, collection, vectors, options, served)
    if ranking.unknown_hits:
        logger.warning("%d hits are not train images of %s; they count as not relevant", ranking.unknown_hits,
                       collection.root)
    return ranking, served, vectors


def _embed(args: argparse.Namespace, collection: Collection, timings: dict[str, float]) -> None:
    with _timed(timings, "embed"):
        for split in ("train", "test"):
            purpose = "index" if split == "train" else "query"  # the indexed side may use fewer views
            features = embed_split(collection.bundle, getattr(collection, split), purpose=purpose,
                                   cache_dir=args.cache_dir, device=args.device)
            setattr(collection, f"{split}_features", features)


def _search(args: argparse.Namespace, collection: Collection, vectors: LocalVectors | None, options: ApiOptions,
            model_version: str | None) -> Ranking:
    rows = document_rows(str(collection.root.resolve()), collection.train.paths)
    if args.url:
        files = [collection.root / path for path in collection.test.paths]
        return asyncio.run(search_api(args.url, files, classes=collection.classes, doc_rows=rows, k=args.k,
                                      options=options, progress=not args.quiet))
    predicted = collection.test_features.predicted
    if args.against_store:
        store = StoreSettings.load() if args.state_dir is None else StoreSettings(state_dir=args.state_dir)
        return asyncio.run(search_store(served_index(store.state_dir), vectors.queries, predicted,
                                        dims=vectors.queries.shape[1], model_version=model_version, doc_rows=rows,
                                        k=args.k, progress=not args.quiet))
    return Ranking(hits=exact_search(vectors.queries, vectors.documents, args.k), predicted=predicted)


def _score(collection: Collection, ranking: Ranking, vectors: LocalVectors | None,
           timings: dict[str, float]) -> tuple[dict[str, Any], np.ndarray, FullRanking | None]:
    """trec_eval's measures, their numpy twins, mAP@ALL, accuracy, per class (what the JSON holds),
    with the relevance of every hit and the full ranking, for the figures."""
    train, test, classes = collection.train, collection.test, collection.classes
    relevant = relevance(ranking.hits, train.labels, test.labels)
    num_relevant = relevant_counts(train.labels, test.labels)
    ours = retrieval_metrics(relevant, num_relevant)
    with _timed(timings, "trec_eval"):
        trec = trec_eval(test.paths, test.labels, ranking.hits, train.paths, train.labels)
    full = None
    if vectors is not None:
        with _timed(timings, "full_ranking"):
            full = full_ranking(vectors.queries, test.labels, vectors.documents, train.labels)
    k = ranking.hits.shape[1]
    metrics = {
        "queries": len(test), "documents": len(train), "k": k,
        "accuracy": float(np.mean(ranking.predicted == test.labels)),
        "map_at_100": float(trec["map"].mean()), "map_cut_100": float(trec["map_cut_100"].mean()),
        "P_10": float(trec["P_10"].mean()), "P_100": float(trec["P_100"].mean()),
        "recip_rank": float(trec["recip_rank"].mean()),
        "map_at_100_normalised": float(ours["map_normalised"].mean()),
        "map_all": None if full is None else float(full.average_precision.mean()),
        "map_at_100_ceiling": float(np.mean(np.minimum(k, num_relevant) / np.maximum(num_relevant, 1))),
        "relevant_per_query": float(num_relevant.mean()),
        "numpy_vs_trec_eval_max_diff": float(max(np.abs(ours[m] - trec[m]).max() for m in ("map", "P_10", "P_100"))),
        "unknown_hits": ranking.unknown_hits,
    }
    result = {"metrics": metrics, "per_class": _per_class(classes, test.labels, ranking.predicted, trec, full),
              "confusion_matrix": confusion_matrix(test.labels, ranking.predicted, len(classes)),
              "precision_recall": None if full is None else {"recall": full.recall, "precision": full.precision}}
    return result, relevant, full


def _per_class(classes: list[str], labels: np.ndarray, predicted: np.ndarray, trec: dict[str, np.ndarray],
               full: FullRanking | None) -> dict[str, dict[str, Any]]:
    n = len(classes)
    columns = {"accuracy": per_class_mean((predicted == labels).astype(float), labels, n),
               "map": per_class_mean(trec["map"], labels, n), "P_100": per_class_mean(trec["P_100"], labels, n),
               "map_all": None if full is None else per_class_mean(full.average_precision, labels, n)}
    counts = np.bincount(labels, minlength=n)
    return {name: {"queries": int(counts[c]),
                   **{key: None if values is None else float(values[c]) for key, values in columns.items()}}
            for c, name in enumerate(classes)}


def _ablation_data(collection: Collection, args: argparse.Namespace) -> AblationData:
    bundle, preprocessing = collection.bundle, collection.bundle.preprocessing
    query_views = None
    if preprocessing.flip_for("index") != preprocessing.flip_for("query"):  # the index-views table
        query_views = embed_split(bundle, collection.train, purpose="query", cache_dir=args.cache_dir,
                                  device=args.device)
    return AblationData(bundle=bundle, train=collection.train_features, test=collection.test_features,
                        train_labels=collection.train.labels, test_labels=collection.test.labels, k=args.k,
                        train_query_views=query_views)


def _config(args: argparse.Namespace, argv: list[str], collection: Collection, model_version: str | None,
            pca_dims: int, onehot_weight: float, settings: EvaluationSettings) -> dict[str, Any]:
    bundle = collection.bundle
    command = "cbir evaluate " + shlex.join(argv) if argv else "cbir evaluate"
    env = " ".join(f"{name}={shlex.quote(value)}" for name, value in settings.reproduction_env().items())
    if args.url:
        mode, description = "api", f"the search API at {args.url} (POST /search?k={args.k})"
    elif args.against_store:
        mode, description = "store", "the indexed embedded store (FaissStore.search)"
    else:
        mode, description = "direct", "exact FAISS inner-product search over vectors built here (as FaissStore)"
    return {
        "command": command, "reproduce": [f"{env} {command}".strip()], "mode": mode, "mode_description": description,
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "data_dir": collection.root,
        "bundle_path": None if bundle is None else bundle.path,
        "bundle_version": None if bundle is None else bundle.version,
        "bundle_metrics": None if bundle is None else bundle.metadata.get("metrics"),
        "flip_tta": None if bundle is None else bundle.preprocessing.flip_tta,
        "index_flip_tta": None if bundle is None else bundle.preprocessing.flip_for("index"),
        "model_version": model_version, "pca_dims": pca_dims if bundle else None,
        "onehot_weight": onehot_weight if bundle else None, "k": args.k,
        "limit_per_class": args.limit_per_class, "query_limit_per_class": args.query_limit_per_class,
        "device": args.device,
    }


def _write_outputs(args: argparse.Namespace, collection: Collection, ranking: Ranking, relevant: np.ndarray,
                   full: FullRanking | None, result: dict[str, Any]) -> None:
    """The TREC files under `trec/<name>/` and the figures; their paths, relative to the report, go in `result`."""
    out, train, test = args.output_dir, collection.train, collection.test
    trec_dir = out / "trec" / args.name
    write_run(trec_dir / "run.trec", test.paths, ranking.hits, train.paths, tag=f"cbir-{result['config']['mode']}")
    write_labels(trec_dir / "labels.tsv", [(test.paths, test.labels), (train.paths, train.labels)], collection.classes)
    files = {"run": trec_dir / "run.trec", "labels": trec_dir / "labels.tsv"}
    if args.write_qrels:
        files["qrels"] = trec_dir / "qrels.txt"
        write_qrels(files["qrels"], test.paths, test.labels, train.paths, train.labels)
    result["files"] = {name: str(path.relative_to(out)) for name, path in files.items()}
    result["figures"] = {name: str(path.relative_to(out))
                         for name, path in _draw(args, collection, ranking, relevant, full, result).items()}


def _draw(args: argparse.Namespace, collection: Collection, ranking: Ranking, relevant: np.ndarray,
          full: FullRanking | None, result: dict[str, Any]) -> dict[str, Path]:
    prefix = args.output_dir / "figures" / args.name
    classes, per_class = collection.classes, result["per_class"]
    drawn = {}
    if full is not None:
        drawn["precision_recall"] = figures.precision_recall(
            Path(f"{prefix}-precision-recall.png"), full.recall, full.precision,
            title=f"Precision–recall, mAP@ALL {full.average_precision.mean():.3f}")
    drawn["per_class_ap"] = figures.per_class_ap(
        Path(f"{prefix}-per-class-ap.png"), classes, np.array([per_class[c]["map"] for c in classes]),
        None if full is None else np.array([per_class[c]["map_all"] for c in classes]),
        ceiling=result["metrics"]["map_at_100_ceiling"],
        study=STUDY["map_at_100"] if result["metrics"]["relevant_per_query"] == 5000 else None)
    drawn["confusion"] = figures.confusion(Path(f"{prefix}-confusion.png"), result["confusion_matrix"], classes)
    picks = _example_queries(collection.test.labels, args.examples, len(classes))
    if picks.size:
        shown = min(10, ranking.hits.shape[1])
        labels = [_query_title(classes, collection.test.labels[q], ranking.predicted[q]) for q in picks]
        drawn["examples"] = figures.example_queries(
            Path(f"{prefix}-examples.png"), collection.test.images[picks], labels,
            collection.train.images[np.maximum(ranking.hits[picks, :shown], 0)], relevant[picks, :shown])
    return drawn


def _example_queries(labels: np.ndarray, count: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """`count` queries, one class after another, drawn at random (seeded) within each class."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == i % num_classes)) for i in range(count)
             if (labels == i % num_classes).any()]
    return np.asarray(picks, dtype=np.int64)


def _query_title(classes: list[str], true: int, predicted: int) -> str:
    return classes[true] if true == predicted else f"{classes[true]}\n(pred. {classes[predicted]})"
