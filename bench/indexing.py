"""End-to-end indexing: `cbir index` of the train split, in-process (eager, and with a cached package) and
through `cbir embedder` over HTTP.

    python bench/indexing.py                # full: 50,000 images three times, a package's build and the
                                            # embedder's compilation: about 12 min on the 2-core CPU machine
    python bench/indexing.py --quick        # 5 images a class, uncompiled but for `cached`: about 40 s

First the yardstick, alone on the machine: the eager bf16 forward of the model at batch 64 (the
embedder's largest micro-batch) with the bundle's index-side views (the shipped bundle: 1 pass
per image). Then each mode in a fresh temporary state dir, as subprocesses on loopback:

    in-process  cbir index DIR --split train                                 (the model in `cbir index`)
    cached      the same, with the package for batches of 64 in the compile cache, as a `cbir serve` with the
                same state dir leaves it (built first, by `python -m services.embedder.aot`; its build time is
                recorded, not counted): under CBIR_COMPILE=auto `cbir index` loads it and builds none
    http        cbir embedder --port P, ready (compiled, if it compiles); then
                CBIR_EMBEDDER_URL=http://127.0.0.1:P cbir index ...

images/s is the collection's image count over the wall-clock seconds of the `cbir index` command
(Python start-up and model load included: what a user waits for; `cbir index` builds no package unless
--compile on: in-process runs eagerly, cached runs the package); the indexer's own figure (its run alone)
is recorded beside it, and its seconds in each stage (plan, read, embed, write) in the details. The goal:
images/s ≥ 0.9 × the yardstick. `cbir index` has no limit of its own, so --limit-per-class indexes a
temporary collection of hard links. Writes bench/results/indexing.json.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
import torch

from services.common.logs import configure_logging

logger = logging.getLogger("bench.indexing")
MODES = ("in-process", "cached", "http")
GOAL_RATIO = 0.9
_SUMMARY = re.compile(r"(\d+) images: indexed (\d+).*?; ([\d.]+) s, (\d+) images/s \(([^)]*)\)")
_STAGE = re.compile(r"(\w+) ([\d.]+) s")
_PACKAGE = re.compile(r"compiled the model for batches of (\d+)")


def get_args_parser() -> argparse.ArgumentParser:
    parser = benchlib.base_parser(__doc__)
    benchlib.add_service_arguments(parser)
    parser.add_argument("--split", default="train", help="the split to index (default %(default)s)")
    parser.add_argument("--modes", type=benchlib.str_list, default=list(MODES),
                        help="comma-separated, of in-process, cached, http (default all three)")
    parser.add_argument("--yardstick-seconds", type=float, default=None,
                        help="timed seconds of the yardstick (default 10; --quick: 0.3)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="the longest a `cbir index` (or the embedder's start) may take, seconds")
    return parser


@dataclass
class IndexRun:
    """One `cbir index` command: its wall-clock seconds, and what its summary line says."""

    mode: str
    images: int  # the collection's image count
    seconds: float
    indexed: int
    indexer_seconds: float
    embedder_ready_s: float | None = None  # http: the embedder's start until ready (compiled)
    package_build_s: float | None = None  # cached: building the package beforehand (not in `seconds`)
    packages: list[int] = field(default_factory=list)  # the batch sizes it ran compiled (its log says so)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # the indexer's per-stage seconds (its summary)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def indexer_images_per_second(self) -> float:
        return self.indexed / self.indexer_seconds if self.indexer_seconds else 0.0


def run_index(root: Path, split: str, *, images: int, state_dir: Path, env: dict[str, str], log: Path,
              timeout_s: float, mode: str = "in-process") -> IndexRun:
    """`cbir index` of `root`/`split` into `state_dir` (a subprocess), timed; exits with its log's tail unless
    it succeeds and indexes all `images`."""
    env = {**env, "CBIR_STATE_DIR": str(state_dir)}
    started = time.perf_counter()
    with benchlib.cbir_process(["index", str(root), "--split", split, "--no-progress"],
                               env=env, log=log) as process:
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # stopped on the way out of cbir_process
            raise SystemExit(f"cbir index did not finish in {timeout_s:.0f} s:\n{benchlib.log_tail(log)}") from None
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    summary = _SUMMARY.search(text)
    if returncode != 0 or summary is None or int(summary.group(2)) != images:
        raise SystemExit(f"cbir index ({mode}) exited with {returncode} without indexing all {images} images:\n"
                         f"{benchlib.log_tail(log)}")
    return IndexRun(mode=mode, images=images, seconds=seconds, indexed=int(summary.group(2)),
                    indexer_seconds=float(summary.group(3)),
                    stage_seconds={name: float(value) for name, value in _STAGE.findall(summary.group(5))},
                    packages=sorted(int(size) for size in _PACKAGE.findall(text)))


def run_mode(mode: str, root: Path, split: str, *, images: int, work: Path, env: dict[str, str],
             timeout_s: float) -> IndexRun:
    state_dir, log = work / mode / "state", work / mode / "index.log"
    log.parent.mkdir(parents=True)
    if mode == "in-process":
        return run_index(root, split, images=images, state_dir=state_dir, env=env, log=log, timeout_s=timeout_s)
    if mode == "cached":
        build_s = build_index_package(state_dir, env=env, timeout_s=timeout_s)
        run = run_index(root, split, images=images, state_dir=state_dir, log=log, timeout_s=timeout_s, mode=mode,
                        env={**env, "CBIR_COMPILE": "cached"})  # --compile off would load nothing
        run.package_build_s = build_s
        return run
    port = benchlib.free_port()
    embedder_log = work / mode / "embedder.log"
    with benchlib.cbir_process(["embedder", "--host", "127.0.0.1", "--port", str(port)], env=env,
                               log=embedder_log) as embedder:
        ready_s = benchlib.wait_for_status(f"http://127.0.0.1:{port}/healthz", statuses=("ready",), process=embedder,
                                           log=embedder_log, timeout_s=timeout_s)
        run = run_index(root, split, images=images, state_dir=state_dir, log=log, timeout_s=timeout_s, mode=mode,
                        env={**env, "CBIR_EMBEDDER_URL": f"http://127.0.0.1:{port}"})
    run.embedder_ready_s = ready_s
    return run


def build_index_package(state_dir: Path, *, env: dict[str, str], timeout_s: float) -> float:
    """Build the package `cbir index` runs its batches of 64 with into `state_dir`'s compile cache, where a `cbir
    serve` leaves it; returns the seconds it took."""
    from services.embedder.aot import build_in_child, package_path
    from services.embedder.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from services.embedder.compilation import compile_cache_dir
    from services.embedder.inference import pick_device

    bundle_dir = Path(env.get("CBIR_MODEL_DIR") or DEFAULT_BUNDLE_DIR)
    bundle, device = load_bundle(bundle_dir), pick_device(env.get("CBIR_DEVICE", "auto"))
    folder = compile_cache_dir(state_dir / "compile-cache", bundle_version=bundle.version, device=device)
    package = package_path(folder, size=benchlib.INDEX_BATCH, image_size=bundle.preprocessing.image_size)
    started = time.perf_counter()
    build_in_child(bundle_dir, size=benchlib.INDEX_BATCH, package=package, device=device, timeout_s=timeout_s)
    logger.info("cached: built %s in %.1f s", package.name, time.perf_counter() - started)
    return time.perf_counter() - started


def figures_and_goals(runs: list[IndexRun], stick: benchlib.Throughput) -> tuple[list[dict], list[dict]]:
    figures, goals = [], []
    for run in runs:
        name = f"cbir index, {run.mode}"
        ratio = run.images_per_second / stick.images_per_second
        figures.append(benchlib.figure(name, run.images_per_second, "images/s", yardstick=stick, ratio=ratio))
        goals.append(benchlib.goal(f"{name}: images/s ≥ {GOAL_RATIO} × the yardstick at batch {stick.batch}, "
                                   f"{stick.views} pass{'es' if stick.views > 1 else ''} per image",
                                   name, ratio, at_least=GOAL_RATIO))
        figures.append(benchlib.figure(f"{name}: the indexer's run alone", run.indexer_images_per_second, "images/s",
                                       yardstick=stick))
    return figures, goals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    configure_logging()
    args = get_args_parser().parse_args(argv)
    if unknown := sorted(set(args.modes) - set(MODES)):
        raise SystemExit(f"--modes {','.join(unknown)}: not one of {', '.join(MODES)}")
    limit = args.limit_per_class or (5 if args.quick else None)
    compile_choice = args.compile or ("off" if args.quick else "auto")
    stick_seconds = args.yardstick_seconds or (0.3 if args.quick else 10.0)
    load = benchlib.require_idle(args.max_load, wait_s=args.idle_wait, allow_busy=args.allow_busy)
    from services.embedder.inference import pick_device

    bundle = benchlib.load_shipped_bundle(args.model_dir)
    model_version, views = bundle.version, benchlib.views_for(bundle, "index")
    stick = benchlib.yardstick(bundle, benchlib.INDEX_BATCH, views, device=pick_device(args.device),
                               seconds=stick_seconds, warmup=1 if args.quick else 3)
    del bundle  # the subprocesses load their own
    with benchlib.work_dir("indexing") as work:
        root, images = benchlib.collection_for(args.data_dir, work, split=args.split, per_class=limit)
        env = benchlib.cbir_env(model_dir=args.model_dir, state_dir=work / "state", device=args.device,
                                compile=compile_choice)
        runs = []
        for mode in args.modes:
            runs.append(run_mode(mode, root, args.split, images=images, work=work, env=env, timeout_s=args.timeout))
            logger.info("%s: %d images in %.1f s, %.1f images/s", mode, images, runs[-1].seconds,
                        runs[-1].images_per_second)
    figures, goals = figures_and_goals(runs, stick)
    result = {
        "load": load,
        "settings": {"quick": args.quick, "model": model_version, "split": args.split, "images": images,
                     "limit_per_class": limit, "compile": compile_choice, "device": args.device,
                     "index_views": views, "modes": args.modes, "yardstick_seconds": stick_seconds,
                     "torch_threads": torch.get_num_threads()},
        "yardsticks": [stick.to_json()],
        "figures": figures,
        "goals": goals,
        "details": {"runs": [{**vars(run), "images_per_second": round(run.images_per_second, 2)} for run in runs]},
    }
    benchlib.write_result("indexing", result, output_dir=args.output_dir, argv=argv)
    return result


if __name__ == "__main__":
    main()
