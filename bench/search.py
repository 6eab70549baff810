"""Search under load: `cbir serve`'s one-client latency, QPS at 1, 4, 16, 64 and 256 clients, and its peak RSS.

    python bench/search.py                  # full: about 10 min on the 2-core CPU machine (an estimate:
                                            # index build, compilation, 5 × 20 s of load)
    python bench/search.py --index state/index.npz --repeat 3   # an existing index; three runs, each reported
    python bench/search.py --quick          # 5 images a class, uncompiled, 1 s a run: about 35 s

Each run (--repeat N: N of them, one after another) first measures the yardsticks, alone on the machine:
the eager bf16 forward of the model with the bundle's query views (the shipped bundle: 2 passes, flip
test-time augmentation) at batch 1 and at each client count (at most the micro-batch, CBIR_MAX_BATCH:
more clients than that share passes no larger). Then, in a temporary state dir: the train split indexed
once by `cbir index` (or --index copied in), `cbir serve --no-index` on a loopback port, waited for until
`/healthz` says `ready` (not `warming_up`: compiled code is what is measured; the wait is recorded), a
short untimed load, then bench/load.py's clients uploading test-split JPEGs for --duration seconds at
each client count. The 256 clients are beyond the server's capacity on purpose: they honour the
`Retry-After` of a 503 as a polite client does, and the row reports the p99 of the answered searches
and the share refused. The server is stopped before each run ends, whatever happens.

Goals, as ratios to the yardsticks, met in every run:
    16 clients   QPS ≥ 0.5 × the yardstick at batch 16 (images/s with the query's passes each), 0 errors
    64 clients   QPS ≥ 0.4 × the yardstick at batch 64, 0 errors
    one client   p50 ≤ 2 × the yardstick's time for one query's views at batch 1
    256 clients  p99 of the answered ≤ 1 s, no error but 503 + Retry-After
Writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import benchlib
import load
import torch
from indexing import run_index

from services.common.logs import configure_logging

logger = logging.getLogger("bench.search")
CLIENTS = (1, 4, 16, 64, 256)
QPS_GOALS = {16: 0.5, 64: 0.4}  # clients: QPS ≥ this × the yardstick, 0 errors
LATENCY_GOAL = 2.0  # one client: p50 ≤ this × the yardstick's time for one query
OVERLOAD_CLIENTS, OVERLOAD_P99_S = 256, 1.0  # past capacity: the answered searches' p99 ≤ this, in seconds
MAX_BATCH = 64  # CBIR_MAX_BATCH's default: the largest forward pass however many clients wait


def get_args_parser() -> argparse.ArgumentParser:
    parser = benchlib.base_parser(__doc__)
    benchlib.add_service_arguments(parser)
    benchlib.add_index_arguments(parser)
    parser.add_argument("--clients", type=benchlib.int_list, default=list(CLIENTS),
                        help="comma-separated client counts (default 1,4,16,64,256; 1, 16, 64 and 256 carry the "
                             "goals)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs one after another, each with its own yardsticks and server, each reported "
                             "(the goals must hold in all of them: --repeat 3)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per count (default 20; "
                                                                     "--quick: 1)")
    parser.add_argument("--warmup-duration", type=float, default=None,
                        help="seconds of untimed load first (default 5; --quick: 0.5)")
    parser.add_argument("--queries", type=Path, default=None,
                        help="folder of query images (default: the collection's test split)")
    parser.add_argument("--max-images", type=int, default=None, help="query images held in memory (default 2000; "
                                                                      "--quick: 100)")
    parser.add_argument("--k", type=int, default=10, help="hits per search")
    parser.add_argument("--yardstick-seconds", type=float, default=None,
                        help="timed seconds of each yardstick (default 10; --quick: 0.3)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="the longest the index build or the server's start may take, seconds")
    return parser


def measure_yardsticks(args: argparse.Namespace, batches: list[int], seconds: float) -> tuple[
        dict[int, benchlib.Throughput], int, str]:
    """The yardstick at each of `batches` with the query's views; the views and the model version."""
    from services.embedder.inference import pick_device

    bundle = benchlib.load_shipped_bundle(args.model_dir)
    views = benchlib.views_for(bundle, "query")
    device = pick_device(args.device)
    sticks = {batch: benchlib.yardstick(bundle, batch, views, device=device, seconds=seconds,
                                        warmup=1 if args.quick else 3) for batch in batches}
    return sticks, views, bundle.version


def prepare_index(args: argparse.Namespace, work: Path, env: dict[str, str], *,
                  limit: int | None) -> tuple[Path, dict[str, Any]]:
    """The collection root `cbir serve` is given, with its index in `work/state`; what building it took."""
    from services.common.collection import find_data_dir

    state = work / "state"
    state.mkdir(parents=True)
    if args.index is not None:
        shutil.copyfile(args.index, state / "index.npz")
        return find_data_dir(args.data_dir), {"index": str(args.index)}
    root, images = benchlib.collection_for(args.data_dir, work, split="train", per_class=limit)
    run = run_index(root, "train", images=images, state_dir=state, env=env, log=work / "index.log",
                    timeout_s=args.timeout)
    if args.save_index is not None:
        args.save_index.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(state / "index.npz", args.save_index)
    return root, {"images": images, "index_seconds": round(run.seconds, 2),
                  "index_images_per_second": round(run.images_per_second, 2)}


def serve_and_load(args: argparse.Namespace, work: Path, env: dict[str, str], queries: list[tuple[str, bytes]], *,
                   duration: float, warmup: float) -> dict[str, Any]:
    """`cbir serve` on the index in `work/state`, loaded at each client count; stopped before returning."""
    port, log = benchlib.free_port(), work / "serve.log"
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    with benchlib.cbir_process(["serve", "--no-index", "--host", "127.0.0.1", "--port", str(port)], env=env,
                               log=log) as server:
        benchlib.wait_for_status(f"{url}/healthz", statuses=("ready", "warming_up"), process=server, log=log,
                                 timeout_s=args.timeout)
        first_answer_s = time.perf_counter() - started
        benchlib.wait_for_status(f"{url}/healthz", statuses=("ready",), process=server, log=log,
                                 timeout_s=args.timeout)
        ready_s = time.perf_counter() - started
        logger.info("cbir serve answered after %.1f s, ready after %.1f s", first_answer_s, ready_s)
        if warmup > 0:
            asyncio.run(load.run_load(url, queries, clients=max(args.clients), duration=warmup, k=args.k))
        runs = {}
        for clients in args.clients:
            runs[clients] = asyncio.run(load.run_load(url, queries, clients=clients, duration=duration, k=args.k,
                                                      pid=server.pid, honor_retry_after=True))
            logger.info("%d clients: %s", clients, runs[clients].summary().replace("\n", "; "))
        peak_rss = load.read_peak_rss(server.pid)
    return {"runs": runs, "first_answer_s": first_answer_s, "ready_s": ready_s, "peak_rss": peak_rss}


def figures_and_goals(runs: dict[int, load.LoadResult], sticks: dict[int, benchlib.Throughput], *,
                      prefix: str = "") -> tuple[list[dict], list[dict]]:
    """The rows of one run and the goals on them; `prefix` names the run when there are several."""
    figures, goals = [], []
    if 1 in runs:
        one, stick = runs[1], sticks[1]
        stick_ms = 1000 * stick.seconds_per_image  # one query's views at batch 1
        for q in (50, 95, 99):
            latency_ms = 1000 * one.percentile(q)
            figures.append(benchlib.figure(f"{prefix}p{q} latency, one client", latency_ms, "ms", yardstick=stick,
                                           yardstick_value=stick_ms, yardstick_unit="ms",
                                           ratio=latency_ms / stick_ms))
        p50_ratio = 1000 * one.percentile(50) / stick_ms
        goals.append(benchlib.goal(f"{prefix}one client: p50 ≤ {LATENCY_GOAL:g} × the yardstick's time for one "
                                   "query's views at batch 1", figures[0]["name"], p50_ratio, at_most=LATENCY_GOAL))
    for clients, run in runs.items():
        stick = sticks[bound_batch(clients)]
        name = f"{prefix}QPS, {clients} client{'s' if clients > 1 else ''} ({run.errors} errors of {run.requests:,})"
        ratio = run.qps / stick.images_per_second  # the yardstick counts queries: each its views' passes
        figures.append(benchlib.figure(name, run.qps, "queries/s", yardstick=stick, ratio=ratio))
        if clients in QPS_GOALS:
            goals.append(benchlib.goal(f"{prefix}{clients} clients: QPS ≥ {QPS_GOALS[clients]:g} × (the yardstick at "
                                       f"batch {clients} ÷ forward passes per query), 0 errors", name, ratio,
                                       at_least=QPS_GOALS[clients], also={"0 errors": run.errors == 0}))
        if clients == OVERLOAD_CLIENTS:
            row, goal = overload_row(run, prefix=prefix)
            figures.append(row)
            goals.append(goal)
    return figures, goals


def overload_row(run: load.LoadResult, *, prefix: str = "") -> tuple[dict, dict]:
    """Past capacity: the p99 of the answered searches, and the share refused with 503 (no other error)."""
    refused = run.error_kinds.get("HTTP 503", 0)
    share = refused / run.requests if run.requests else 0.0
    p99_s = run.percentile(99)
    name = (f"{prefix}p99 latency of the answered, {OVERLOAD_CLIENTS} clients ({share:.0%} of {run.requests:,} "
            "refused with 503)")
    row = benchlib.figure(name, 1000 * p99_s, "ms", refused_share=round(share, 4))
    goal = benchlib.goal(f"{prefix}{OVERLOAD_CLIENTS} clients: p99 of the answered ≤ {OVERLOAD_P99_S:g} s (the "
                         "ratio: seconds), no error but 503", name, p99_s, at_most=OVERLOAD_P99_S,
                         also={"no error but 503": run.errors == refused, "some answered": bool(run.latencies)})
    return row, goal


def bound_batch(clients: int) -> int:
    """The yardstick's batch for `clients`: no forward pass holds more than the micro-batch."""
    return min(clients, MAX_BATCH)


def measure_run(args: argparse.Namespace, work: Path, env: dict[str, str], queries: list[tuple[str, bytes]], *,
                duration: float, warmup: float, stick_seconds: float) -> dict[str, Any]:
    """One run: the yardsticks alone, then `cbir serve` under each client count."""
    batches = sorted({1, 16, *(bound_batch(n) for n in args.clients)})
    sticks, views, model_version = measure_yardsticks(args, batches, stick_seconds)
    served = serve_and_load(args, work, env, queries, duration=duration, warmup=warmup)
    return {"sticks": sticks, "views": views, "model_version": model_version, **served}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    args = get_args_parser().parse_args(argv)
    if not args.clients or not all(1 <= n <= load.MAX_CLIENTS for n in args.clients):
        raise SystemExit(f"--clients: counts of 1–{load.MAX_CLIENTS}")
    if not 1 <= args.repeat <= 10:
        raise SystemExit("--repeat: 1–10 runs")
    limit = args.limit_per_class or (5 if args.quick else None)
    compile_choice = args.compile or ("off" if args.quick else "auto")
    duration = args.duration or (1.0 if args.quick else 20.0)
    warmup = args.warmup_duration if args.warmup_duration is not None else (0.5 if args.quick else 5.0)
    stick_seconds = args.yardstick_seconds or (0.3 if args.quick else 10.0)
    max_images = args.max_images or (100 if args.quick else 2000)
    idle = benchlib.require_idle(args.max_load, wait_s=args.idle_wait, allow_busy=args.allow_busy)
    from services.common.collection import find_data_dir

    queries = load.load_images(args.queries or find_data_dir(args.data_dir) / "test", limit=max_images)
    measured = []
    with benchlib.work_dir("search") as work:
        env = benchlib.cbir_env(model_dir=args.model_dir, state_dir=work / "state", device=args.device,
                                compile=compile_choice)
        root, index = prepare_index(args, work, env, limit=limit)
        env.update(CBIR_DATA_DIR=str(root), CBIR_INDEX_SPLIT="train")
        for number in range(1, args.repeat + 1):
            # Yardsticks before each server starts, so that the two never compete for the cores.
            measured.append(measure_run(args, work, env, queries, duration=duration, warmup=warmup,
                                        stick_seconds=stick_seconds))
            logger.info("run %d of %d done", number, args.repeat)
    figures, goals = [], []
    for number, run in enumerate(measured, start=1):
        prefix = f"run {number} of {args.repeat}: " if args.repeat > 1 else ""
        run_figures, run_goals = figures_and_goals(run["runs"], run["sticks"], prefix=prefix)
        figures += run_figures + [
            benchlib.figure(f"{prefix}cbir serve: start to ready (compiled)", run["ready_s"], "s"),
            benchlib.figure(f"{prefix}cbir serve: start to first answer", run["first_answer_s"], "s"),
            benchlib.figure(f"{prefix}peak RSS of cbir serve", (run["peak_rss"] or 0) / 2**20, "MB"),
        ]
        goals += run_goals
    first = measured[0]
    result = {
        "load": idle,
        "settings": {"quick": args.quick, "model": first["model_version"], "query_views": first["views"],
                     "clients": args.clients, "repeat": args.repeat, "duration_s": duration, "warmup_s": warmup,
                     "k": args.k, "compile": compile_choice, "device": args.device, "limit_per_class": limit,
                     "query_images": len(queries), "yardstick_seconds": stick_seconds,
                     "torch_threads": torch.get_num_threads(), **index},
        "yardsticks": [stick.to_json() for run in measured for stick in run["sticks"].values()],
        "figures": figures,
        "goals": goals,
        "details": {"repeats": [_details(run) for run in measured],
                    "all_goals_met": all(goal["met"] for goal in goals)},
    }
    benchlib.write_result("search", result, output_dir=args.output_dir, argv=argv)
    return result


def _details(run: dict[str, Any]) -> dict[str, Any]:
    return {"runs": {str(clients): _run_json(result) for clients, result in run["runs"].items()},
            "peak_rss_bytes": run["peak_rss"], "ready_s": round(run["ready_s"], 2),
            "first_answer_s": round(run["first_answer_s"], 2)}


def _run_json(run: load.LoadResult) -> dict[str, Any]:
    return {"requests": run.requests, "errors": run.errors, "error_kinds": dict(run.error_kinds),
            "seconds": round(run.seconds, 3), "qps": round(run.qps, 2),
            **{f"p{q}_ms": round(1000 * run.percentile(q), 3) for q in (50, 95, 99)},
            "rss_before": run.rss_before, "rss_peak": run.rss_peak, "rss_after": run.rss_after}


if __name__ == "__main__":
    main()
