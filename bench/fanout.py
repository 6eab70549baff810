"""A model of one query's fan-out over S shards on a node with T search threads: its p50 and p99 latency.

This is a simulation, not a measurement of Elasticsearch. What it measures is the vector work one shard does,
with FAISS on this machine; what it models is how Elasticsearch schedules that work: a query becomes one task per
shard, each task runs on one thread of the node's search pool ("searches run on a single thread per shard",
Elastic's *Size your shards*), at most `--max-concurrent-shard-requests` of one query's tasks run at once (the
search API's per-node limit, default 5), and the coordinating node merges the shards' top-k lists.

    python bench/fanout.py            # about 1 min on the 2-core CPU machine (a 1,000,000-vector flat scan
                                      # timed 200 times, five HNSW graphs of up to 200,000 vectors built)
    python bench/fanout.py --quick    # small shards, few samples: a few seconds

1. Per-shard cost: synthetic unit vectors shaped like ours (74 dims, ten class centres plus noise), N images
   split into S equal shards; one shard of N/S vectors searched by one query at a time on one thread,
   `--repeats` times, the shard sizes of one index (N, kind) in turn (so that background load falls on all
   alike, and the CPU caches hold what one node's would): flat (every vector compared, as `script_score` or a
   `flat` index does) and HNSW (M 16, efConstruction 100, efSearch = num_candidates 200: Elasticsearch's
   defaults) where the shard has at most `--hnsw-max-shard` vectors (a graph of 1,000,000 would take minutes to
   build here).
2. Merge cost: S top-k lists (score, id) merged into one top k with numpy, `--repeats` times.
3. The model, per configuration, from those samples:
   - one query at a time: its S tasks, each of a sampled shard cost (+ `--shard-overhead-ms`), handed in order
     to the earliest free of min(T, limit) threads; latency = the last task's end + a sampled merge;
   - under load: queries arrive at random (Poisson) at the rate that keeps a 1-shard index `--load` busy on
     T = 4 threads; all queries' tasks share the T threads in arrival order (a discrete-event simulation).
   p50 and p99 over `--queries` simulated queries.
4. Break-even: the per-shard cost of Elasticsearch's own (which the model leaves out) below which S shards still
   answer one query sooner than 1 on T = 4: o = (L1 - LS) / (waves - 1), with L the modelled p50s without it and
   waves = ceil(S / min(4, limit)); "never" where S shards are slower already.

Not modelled: Elasticsearch's own per-shard overhead (request, rewrite, collectors; set `--shard-overhead-ms` to
add one), the fetch phase, the network, segments (a shard of several segments searches each), intra-shard
concurrency (8.12+ may split a big shard's segments over the search_worker pool), and how Lucene's HNSW and
int8/bbq comparisons differ in cost from FAISS's float ones.

Writes bench/results/fanout.json; prints the table docs/elasticsearch.md shows (*What the fan-out costs*).
"""

from __future__ import annotations

import argparse
import heapq
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import benchlib
import faiss
import numpy as np

from services.common.logs import configure_logging

logger = logging.getLogger("bench.fanout")
DIMS = 74  # the shipped model: 64 PCA dims + 10 class scores
SIZES = (50_000, 1_000_000)
SHARDS = (1, 5, 30)
THREADS = (4, 16)  # int(allocated processors × 3 / 2) + 1: a 2-core node has 4 search threads, a 10-core one 16
MAX_CONCURRENT_SHARD_REQUESTS = 5  # the search API's default, per node
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 100  # Elasticsearch's defaults (Lucene99HnswVectorsFormat)
LOAD_THREADS = 4


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shards and few samples: a few seconds")
    parser.add_argument("--allow-busy", action="store_true",
                        help="measure even when the machine is busy; the result then says \"busy\": true")
    parser.add_argument("--max-load", type=float, default=benchlib.MAX_LOAD,
                        help="the highest 1-minute load average at which to start (default %(default)s)")
    parser.add_argument("--idle-wait", type=float, default=120.0,
                        help="seconds to wait for the load to drop before refusing (default %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=benchlib.RESULTS_DIR,
                        help="where fanout.json goes (default bench/results)")
    parser.add_argument("--sizes", type=benchlib.int_list, default=None,
                        help="comma-separated collection sizes N (default 50000,1000000; --quick: 5000,20000)")
    parser.add_argument("--shards", type=benchlib.int_list, default=list(SHARDS), help="shard counts S")
    parser.add_argument("--threads", type=benchlib.int_list, default=list(THREADS),
                        help="search threads T of the node (default 4,16)")
    parser.add_argument("--max-concurrent-shard-requests", type=int, default=MAX_CONCURRENT_SHARD_REQUESTS,
                        help="a query's tasks running at once on a node (the search API's default, 5)")
    parser.add_argument("--k", type=int, default=10, help="hits per shard and per query")
    parser.add_argument("--num-candidates", type=int, default=200, help="HNSW efSearch (CBIR_ES_NUM_CANDIDATES)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed single-query searches per shard size (default 200; --quick: 20)")
    parser.add_argument("--queries", type=int, default=None,
                        help="simulated queries per configuration (default 4000; --quick: 400)")
    parser.add_argument("--hnsw-max-shard", type=int, default=200_000,
                        help="build HNSW graphs of shards of at most this many vectors (default %(default)s)")
    parser.add_argument("--shard-overhead-ms", type=float, default=0.0,
                        help="a fixed cost added to every shard task (Elasticsearch's own; default 0: none)")
    parser.add_argument("--load", type=float, default=0.5,
                        help="utilisation of a 1-shard index on 4 threads that sets the arrival rate (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ---------------------------------------------------------------------------------------------
# Measured: one shard's vector work, and the coordinator's merge


def synthetic_vectors(count: int, *, dims: int = DIMS, seed: int = 0) -> np.ndarray:
    """`count` unit float32 vectors around ten class centres, as our embeddings cluster by class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, dims)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((count, dims), dtype=np.float32)
    for start in range(0, count, 100_000):
        stop = min(count, start + 100_000)
        labels = rng.integers(0, 10, stop - start)
        block = centres[labels] + rng.normal(scale=0.15, size=(stop - start, dims)).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def build_shard(vectors: np.ndarray, kind: str, *, num_candidates: int) -> tuple[faiss.Index, float]:
    """One shard holding `vectors`: an exact inner-product index, or an HNSW graph as Elasticsearch builds it;
    and the seconds the build took."""
    started = time.perf_counter()
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(vectors.shape[1])
    else:
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    if kind == "hnsw":
        index.hnsw.efSearch = num_candidates
    return index, time.perf_counter() - started


def shard_costs(shards: dict[Any, faiss.Index], *, k: int, repeats: int, queries: np.ndarray) -> dict[Any, np.ndarray]:
    """Seconds of `repeats` single-query searches of each shard (one thread), taken in turns, one query for every
    shard and then the next, so that whatever else the machine does falls on all of them alike, and the caches
    hold what a node holding all of them would hold."""
    for index in shards.values():  # warm caches and code paths
        for query in queries[:3]:
            index.search(query[None, :], k)
    costs = {key: np.empty(repeats) for key in shards}
    for i in range(repeats):
        query = queries[i % len(queries)][None, :]
        for key, index in shards.items():
            started = time.perf_counter()
            index.search(query, k)
            costs[key][i] = time.perf_counter() - started
    return costs


def merge_costs(shards: int, *, k: int, repeats: int, seed: int = 0) -> np.ndarray:
    """Seconds to merge `shards` top-k lists into the top k, as the coordinating node does, with numpy."""
    rng = np.random.default_rng(seed)
    lists = [(np.sort(rng.random(k, dtype=np.float32))[::-1], rng.integers(0, 2**31, k)) for _ in range(shards)]
    costs = np.empty(repeats)
    for i in range(repeats):
        started = time.perf_counter()
        scores = np.concatenate([s for s, _ in lists])
        ids = np.concatenate([d for _, d in lists])
        top = np.argsort(-scores, kind="stable")[:k]
        _ = ids[top], scores[top]
        costs[i] = time.perf_counter() - started
    return costs


# ---------------------------------------------------------------------------------------------
# Modelled: the search pool


def lone_query_latencies(costs: np.ndarray, merges: np.ndarray, *, shards: int, threads: int, limit: int | None,
                         queries: int, overhead_s: float, rng: np.random.Generator) -> np.ndarray:
    """One query at a time: its `shards` tasks go in order to the earliest free of min(threads, limit)
    threads; the last one's end plus a merge is its latency."""
    lanes = min(threads, limit) if limit else threads
    tasks = rng.choice(costs, size=(queries, shards)) + overhead_s
    latencies = np.empty(queries)
    for q in range(queries):
        free = [0.0] * min(lanes, shards)
        for cost in tasks[q]:
            heapq.heapreplace(free, free[0] + cost)
        latencies[q] = max(free)
    return latencies + rng.choice(merges, size=queries)


def loaded_latencies(costs: np.ndarray, merges: np.ndarray, *, shards: int, threads: int, limit: int | None,
                     rate: float, queries: int, overhead_s: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals at `rate` per second; every query's tasks queue for the `threads` in order, at most
    `limit` of one query's at once (its next task queues when one ends). Latency: arrival to last task + merge."""
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=queries))
    tasks = rng.choice(costs, size=(queries, shards)) + overhead_s
    per_query = min(limit, shards) if limit else shards
    events = [(float(t), 0, q) for q, t in enumerate(arrivals)]  # (time, 0: arrives / 1: a task ends, query)
    heapq.heapify(events)
    waiting: deque[tuple[int, float]] = deque()
    issued, finished = np.zeros(queries, dtype=int), np.zeros(queries, dtype=int)
    done = np.empty(queries)
    idle = threads
    while events:
        now, kind, q = heapq.heappop(events)
        if kind == 0:
            for _ in range(per_query):
                waiting.append((q, tasks[q, issued[q]]))
                issued[q] += 1
        else:
            idle += 1
            finished[q] += 1
            if issued[q] < shards:
                waiting.append((q, tasks[q, issued[q]]))
                issued[q] += 1
            if finished[q] == shards:
                done[q] = now
        while idle and waiting:
            task_query, cost = waiting.popleft()
            idle -= 1
            heapq.heappush(events, (now + cost, 1, task_query))
    return done - arrivals + rng.choice(merges, size=queries)


def percentiles_ms(latencies: np.ndarray) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 4),
            "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 4)}


def model_rows(measured: dict[tuple[int, str, int], dict[str, Any]], merges: dict[int, np.ndarray],
               args: argparse.Namespace, *, queries: int) -> list[dict[str, Any]]:
    """One row per (N, index kind, S): the shard cost, then the modelled latencies."""
    rng = np.random.default_rng(args.seed)
    overhead = args.shard_overhead_ms / 1000
    limit = args.max_concurrent_shard_requests
    rows: list[dict[str, Any]] = []
    by_key: dict[tuple[int, str, int], dict[str, Any]] = {}
    for (size, kind, shards), shard in sorted(measured.items()):
        costs = shard["costs"]
        row: dict[str, Any] = {"images": size, "index": kind, "shards": shards, "shard_size": shard["shard_size"],
                               "shard_cost_ms": percentiles_ms(costs),
                               "merge_ms": percentiles_ms(merges[shards])["p50_ms"], "lone": {}}
        for threads in args.threads:
            lone = lone_query_latencies(costs, merges[shards], shards=shards, threads=threads, limit=limit,
                                        queries=queries, overhead_s=overhead, rng=rng)
            row["lone"][f"T={threads}"] = percentiles_ms(lone)
        top = max(args.threads)
        if top > limit:  # the same node with the per-query limit raised to S
            lone = lone_query_latencies(costs, merges[shards], shards=shards, threads=top, limit=None,
                                        queries=queries, overhead_s=overhead, rng=rng)
            row["lone"][f"T={top}, no limit"] = percentiles_ms(lone)
        one_shard = measured.get((size, kind, 1))
        single = by_key.get((size, kind, 1))  # sorted: the 1-shard row comes first
        if single is not None and shards > 1 and "T=4" in row["lone"]:
            waves = math.ceil(shards / min(4, limit))
            gain = single["lone"]["T=4"]["p50_ms"] - row["lone"]["T=4"]["p50_ms"]
            row["break_even_overhead_ms"] = round(gain / (waves - 1), 4) if gain > 0 and waves > 1 else None
        if one_shard is not None:
            rate = args.load * LOAD_THREADS / (float(np.mean(one_shard["costs"])) + overhead)
            utilisation = rate * shards * (float(np.mean(costs)) + overhead) / LOAD_THREADS
            row["loaded"] = {"threads": LOAD_THREADS, "qps": round(rate, 1), "utilisation": round(utilisation, 3)}
            if utilisation < 0.95:
                loaded = loaded_latencies(costs, merges[shards], shards=shards, threads=LOAD_THREADS, limit=limit,
                                          rate=rate, queries=queries, overhead_s=overhead, rng=rng)
                row["loaded"].update(percentiles_ms(loaded))
        rows.append(row)
        by_key[(size, kind, shards)] = row
    return rows


# ---------------------------------------------------------------------------------------------
# The table


def _cell(latency: dict[str, float] | None) -> str:
    if latency is None or "p50_ms" not in latency:
        return "–"
    return f"{_ms(latency['p50_ms'])} / {_ms(latency['p99_ms'])}"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def render_table(rows: list[dict[str, Any]], threads: list[int], limit: int) -> str:
    """The model as a Markdown table: p50 / p99 in ms."""
    columns = [f"T={t}" for t in threads]
    if max(threads) > limit:
        columns.append(f"T={max(threads)}, no limit")
    header = ["images", "index", "shards", "vectors a shard", "one shard search, p50 / p99",
              *(f"one query, {c}" for c in columns), f"under load, T={LOAD_THREADS}",
              "beats 1 shard (T=4) while ES's own cost a shard is under"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        loaded = row.get("loaded")
        if loaded is None:
            load_cell = "–"
        elif "p50_ms" in loaded:
            load_cell = f"{_cell(loaded)} at {loaded['qps']:,.0f} q/s"
        else:
            load_cell = f"saturated at {loaded['qps']:,.0f} q/s (work {loaded['utilisation']:.2f}× the threads')"
        if "break_even_overhead_ms" not in row:
            even = "–"
        elif row["break_even_overhead_ms"] is None:
            even = "never"
        else:
            even = f"{_ms(row['break_even_overhead_ms'])} ms"
        cells = [f"{row['images']:,}", row["index"], str(row["shards"]), f"{row['shard_size']:,}",
                 _cell(row["shard_cost_ms"]), *(_cell(row["lone"].get(c)) for c in columns), load_cell, even]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_figures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows report.py puts in docs/performance.md's table: one query's p50 on 4 threads, 1 and 30 shards."""
    figures = []
    for row in rows:
        if row["shards"] in (1, 30) and "T=4" in row["lone"]:
            name = (f"model (not Elasticsearch): {row['images']:,} images, {row['index']}, {row['shards']} "
                    f"shard{'s' if row['shards'] > 1 else ''} on 4 threads, one query p50")
            figures.append(benchlib.figure(name, row["lone"]["T=4"]["p50_ms"], "ms"))
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    args = get_args_parser().parse_args(argv)
    sizes = args.sizes or ([5_000, 20_000] if args.quick else list(SIZES))
    repeats = args.repeats or (20 if args.quick else 200)
    queries = args.queries or (400 if args.quick else 4000)
    if not all(s >= 1 for s in [*sizes, *args.shards, *args.threads]) or args.k < 1:
        raise SystemExit("--sizes, --shards, --threads and --k must be positive")
    idle = benchlib.require_idle(args.max_load, wait_s=args.idle_wait, allow_busy=args.allow_busy)
    faiss.omp_set_num_threads(1)  # a shard's search runs on one thread
    started = time.perf_counter()

    vectors = synthetic_vectors(max(sizes), seed=args.seed)
    probes = synthetic_vectors(64, seed=args.seed + 1)
    configurations = [(size, kind, shards, math.ceil(size / shards)) for size in sizes for shards in args.shards
                      for kind in ("flat", "hnsw")]
    configurations = [c for c in configurations if c[1] == "flat" or c[3] <= args.hnsw_max_shard]
    built: dict[tuple[str, int], tuple[faiss.Index, float]] = {}
    for _, kind, _, shard_size in configurations:
        if (kind, shard_size) not in built:
            built[(kind, shard_size)] = build_shard(vectors[:shard_size], kind, num_candidates=args.num_candidates)
            logger.info("built a %s shard of %d vectors in %.1f s", kind, shard_size, built[(kind, shard_size)][1])
    measured: dict[tuple[int, str, int], dict[str, Any]] = {}
    for size, kind in dict.fromkeys((c[0], c[1]) for c in configurations):  # one index's shard sizes in turn
        group = {shard_size: built[(kind, shard_size)][0] for n, k, _, shard_size in configurations
                 if (n, k) == (size, kind)}
        costs = shard_costs(group, k=args.k, repeats=repeats, queries=probes)
        for shard_size, samples in costs.items():
            logger.info("%s, %d images: a shard of %d vectors: p50 %.3f ms", kind, size, shard_size,
                        np.median(samples) * 1000)
        for n, k, shards, shard_size in configurations:
            if (n, k) == (size, kind):
                measured[(size, kind, shards)] = {"shard_size": shard_size, "costs": costs[shard_size]}
    merges = {shards: merge_costs(shards, k=args.k, repeats=max(repeats, 200), seed=args.seed)
              for shards in args.shards}
    rows = model_rows(measured, merges, args, queries=queries)
    table = render_table(rows, args.threads, args.max_concurrent_shard_requests)
    print("\nA model, not a measurement of Elasticsearch: FAISS shard costs measured here, scheduled on T threads "
          f"({args.max_concurrent_shard_requests} of a query's shards at once); p50 / p99 in ms.\n")
    print(table, flush=True)

    result = {
        "load": idle,
        "settings": {"quick": args.quick, "model": "simulation, not a measurement of Elasticsearch", "dims": DIMS,
                     "sizes": sizes, "shards": args.shards, "threads": args.threads, "k": args.k,
                     "num_candidates": args.num_candidates, "hnsw": {"m": HNSW_M, "ef_construction":
                                                                     HNSW_EF_CONSTRUCTION},
                     "max_concurrent_shard_requests": args.max_concurrent_shard_requests,
                     "shard_overhead_ms": args.shard_overhead_ms, "load": args.load, "load_threads": LOAD_THREADS,
                     "repeats": repeats, "queries": queries, "hnsw_max_shard": args.hnsw_max_shard,
                     "faiss": faiss.__version__, "seed": args.seed,
                     "seconds": round(time.perf_counter() - started, 1)},
        "figures": headline_figures(rows),
        "model": rows,
        "table": table,
        "details": {"builds_s": {f"{kind} {size}": round(seconds, 2) for (kind, size), (_, seconds) in
                                 sorted(built.items())}},
    }
    benchlib.write_result("fanout", result, output_dir=args.output_dir, argv=argv)
    return result


if __name__ == "__main__":
    main()
