"""What one write costs the embedded store as the collection grows: `python bench/scale.py --writes` (this module),
`--sizes` as bench/scale.py's (default 10⁴ and 10⁶; --quick: 2,000 and 20,000), its stores in $TMPDIR (else /tmp),
its result bench/results/scale_writes.json.

At each size N (default 10⁴ and 10⁶) a fresh `FaissStore` in a temporary folder is filled through its bulk path
(`upsert` in batches of 10,000, then `flush`: the fold that writes the index file); then 1,000 single `add`s of
new documents and 1,000 single `remove`s of stored ones are timed one by one at the store's interface (each returns
once its log record is fsynced), the sizes taking turns write by write, so that the disk's moods fall on every size
alike; `flush` then folds them (timed). Vectors are bench/scale.py's
synthetic ones (74 dims, unit length). The goal: p50 and p99 at the largest size within 2× of the smallest's,
measured in the same run (the smallest size is the yardstick). At 10⁶ documents `CBIR_FAISS_INDEX=auto` wants the
HNSW graph; this bench runs no search, so none is built and each write only notes its id for the graph's next
build, as a store does before its first search.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np

from services.common.documents import ImageDocument
from services.common.stores.faiss import FaissStore

logger = logging.getLogger("bench.scale.writes")

WRITE_SIZES = (10_000, 1_000_000)
QUICK_WRITE_SIZES = (2_000, 20_000)
WRITES, QUICK_WRITES, BULK_BATCH = 1_000, 200, 10_000
GOAL = 2.0  # the largest size's p50 and p99 at most this × the smallest's
MODEL_VERSION = "bench-scale-writes"


def documents(prefix: str, vectors: np.ndarray, *, first: int = 0) -> list[ImageDocument]:
    return [ImageDocument(id=f"{prefix}-{i:07d}", filename=f"{i}.jpg", path=f"bench/{i}.jpg", source="/bench",
                          label=None, predicted_label="cat", confidence=0.5, size=1000 + i, mtime=float(i),
                          model_version=MODEL_VERSION, vector=vector) for i, vector in enumerate(vectors, first)]


def percentiles(seconds: list[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * statistics.median(seconds), "p99_ms": 1000 * float(np.percentile(seconds, 99)),
            "mean_ms": 1000 * statistics.mean(seconds)}


async def filled_store(n: int, base: np.ndarray, folder: Path) -> tuple[FaissStore, dict[str, Any]]:
    """A store of the `n` documents of `base`, filled through its bulk path (batched upserts, then the fold)."""
    store = FaissStore(folder / "index.npz")
    await store.open(dims=base.shape[1], model_version=MODEL_VERSION)
    started = time.perf_counter()
    for start in range(0, n, BULK_BATCH):
        await store.upsert(documents("doc", base[start:start + BULK_BATCH], first=start))
    bulk_s = time.perf_counter() - started
    started = time.perf_counter()
    await store.flush()
    logger.info("N=%d: filled in %.1f s, folded in %.1f s", n, bulk_s, time.perf_counter() - started)
    return store, {"n": n, "bulk_upsert_s": bulk_s, "first_fold_s": time.perf_counter() - started}


async def measure(stores: list[FaissStore], rows: list[dict[str, Any]], fresh: np.ndarray, *, writes: int) -> None:
    """Time `writes` single adds (of `fresh`), then as many single removes, on every store in turn (the order
    alternating), so the disk's moods fall on every size alike; then the fold of what they logged."""
    timings: list[dict[str, list[float]]] = [{"add": [], "remove": []} for _ in stores]
    doomed = [[f"doc-{i:07d}" for i in np.random.default_rng(row["n"]).choice(row["n"], writes, replace=False)]
              for row in rows]
    for op in ("add", "remove"):
        for step, document in enumerate(documents("new", fresh[:writes])):
            for which in range(len(stores))[::1 if step % 2 else -1]:
                started = time.perf_counter()
                done = await (stores[which].add(document) if op == "add" else stores[which].remove(doomed[which][step]))
                timings[which][op].append(time.perf_counter() - started)
                assert done
    for store, row, timing in zip(stores, rows, timings, strict=True):
        row |= {"count_after": await store.count(), "index_kind": store.index_kind,
                "add": percentiles(timing["add"]), "remove": percentiles(timing["remove"])}
        started = time.perf_counter()
        await store.flush()  # the fold of what the log holds
        row["fold_s"] = time.perf_counter() - started
        await store.close()
        logger.info("N=%d: add p50 %.2f ms p99 %.2f ms, remove p50 %.2f ms p99 %.2f ms, fold %.1f s", row["n"],
                    row["add"]["p50_ms"], row["add"]["p99_ms"], row["remove"]["p50_ms"], row["remove"]["p99_ms"],
                    row["fold_s"])


async def measure_sizes(sizes: list[int], centres: Any, sample_rng: Any, fresh: np.ndarray, *, writes: int,
                        folder: Path) -> list[dict[str, Any]]:  # fmt: skip
    stores, rows = [], []
    for n in sizes:
        (folder / str(n)).mkdir()
        store, row = await filled_store(n, centres.sample(n, sample_rng(2)), folder / str(n))
        stores.append(store)
        rows.append(row)
        gc.collect()
    await measure(stores, rows, fresh, writes=writes)
    return rows


def main(args: Any, argv: list[str] | None, *, load: dict[str, Any], centres: Any) -> dict[str, Any]:
    """The `--writes` run of bench/scale.py (its parsed `args`, `centres` its synthetic vectors' centres): the result
    (figures, goals, details), written to `scale_writes.json`."""

    def sample_rng(offset: int) -> np.random.Generator:
        return np.random.default_rng(args.seed + offset)

    sizes = args.sizes or list(QUICK_WRITE_SIZES if args.quick else WRITE_SIZES)
    writes = QUICK_WRITES if args.quick else WRITES
    fresh = centres.sample(writes, sample_rng(1))
    with tempfile.TemporaryDirectory(prefix="cbir-scale-writes-") as folder:  # $TMPDIR, else /tmp
        rows = asyncio.run(measure_sizes(sizes, centres, sample_rng, fresh, writes=writes, folder=Path(folder)))
    smallest, largest = rows[0], rows[-1]
    figures, goals = [], []
    for row in rows:
        for op in ("add", "remove"):
            for stat in ("p50", "p99"):
                name = f"N={row['n']:,}: single {op}, {stat} ({row['index_kind']})"
                figure = benchlib.figure(name, row[op][f"{stat}_ms"], "ms")
                if row is not smallest:  # the yardstick: the same figure at the smallest size, in this run
                    ratio = row[op][f"{stat}_ms"] / smallest[op][f"{stat}_ms"]
                    figure["ratio"] = float(f"{ratio:.4g}")  # as benchlib rounds a goal's ratio
                    if row is largest:
                        goals.append(benchlib.goal(f"{op} {stat} at N={row['n']:,} within {GOAL:g}× of N="
                                                   f"{smallest['n']:,}", name, ratio, at_most=GOAL))
                figures.append(figure)
        figures.append(benchlib.figure(f"N={row['n']:,}: fold of the log into the index file", row["fold_s"], "s"))
    settings = {"quick": args.quick, "sizes": sizes, "writes": writes, "dims": fresh.shape[1], "bulk_batch": BULK_BATCH,
                "state_dir": tempfile.gettempdir()}
    result = {"load": load, "settings": settings, "yardsticks": [], "figures": figures, "goals": goals,
              "details": {"rows": rows}}
    benchlib.write_result("scale_writes", result, output_dir=args.output_dir, argv=argv, script="scale")
    return result
