"""What the speed benches share: the machine and commit a figure belongs to, the idle check, the
yardstick, `cbir` subprocesses on loopback, and the result files in bench/results/.

Timings on shared machines drift up to 2× from day to day, so every goal is a ratio to the
yardstick measured in the same run: the eager bf16 forward pass of the shipped model
(`services.embedder.inference.predict`, as the embedder runs it uncompiled), in images per second
at a given batch, each image costing `views` passes (2 with flip test-time augmentation).

    idle = require_idle(max_load=0.5, wait_s=120, allow_busy=False)   # exit code 3 when busy
    stick = yardstick(bundle, batch=64, views=1, device=torch.device("cpu"))
    write_result("indexing", {"load": idle, "settings": ..., "figures": [...], "goals": [...]})
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
BUSY_EXIT_CODE = 3
MAX_LOAD = 0.5
# The yardstick's batch for indexing and the embedder's default largest micro-batch (CBIR_MAX_BATCH).
INDEX_BATCH = 64

logger = logging.getLogger("bench")


# ---------------------------------------------------------------------------------------------
# Where a figure comes from


def machine() -> dict[str, Any]:
    """The CPU model, cores, torch version and threads, the CUDA device (or None) and the date (UTC)."""
    import torch

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "hostname": platform.node(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def commit(repo: Path = REPO_ROOT) -> str:
    """git HEAD, with "+dirty" when tracked files differ from it (bench/results/ aside: a run writing
    its result must not make the next one dirty); "unknown" outside a git checkout."""
    try:
        head = _git(repo, "rev-parse", "HEAD")
        changes = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".",
                       ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if changes else "")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def require_idle(max_load: float = MAX_LOAD, *, wait_s: float = 120.0, allow_busy: bool = False,
                 poll_s: float = 5.0) -> dict[str, Any]:
    """Wait up to `wait_s` for the 1-minute load average to reach `max_load`; then refuse (message, exit
    code 3) unless `allow_busy`, in which case the run goes on and its result says `"busy": true`.
    Returns what was seen, for the result file."""
    started = time.monotonic()
    while (reading := load_average()) > max_load and (waited := time.monotonic() - started) < wait_s:
        logger.info("load average %.2f > %.2f: waiting (%.0f of %.0f s)", reading, max_load, waited, wait_s)
        time.sleep(min(poll_s, max(0.0, wait_s - waited)))
    busy = reading > max_load
    seen = {"load_1min": round(reading, 2), "max_load": max_load, "waited_s": round(time.monotonic() - started, 1),
            "busy": busy}
    if busy and not allow_busy:
        print(f"refusing to measure: the 1-minute load average is {reading:.2f} (above {max_load}) after waiting "
              f"{wait_s:.0f} s; other work on this machine would skew the figures. Run it on an idle machine, "
              "or pass --allow-busy to record anyway (the result then says \"busy\": true).", file=sys.stderr)
        raise SystemExit(BUSY_EXIT_CODE)
    if busy:
        logger.warning("recording while busy (load %.2f): the result says \"busy\": true", reading)
    return seen


# ---------------------------------------------------------------------------------------------
# The yardstick: the shipped model's eager forward pass


@dataclass(frozen=True)
class Throughput:
    """Forward passes measured back to back: `images_per_second` counts images, each `views` passes, at the
    median batch's time (a batch slowed by another process's burst moves it little); the mean beside it."""

    mode: str  # "eager bf16" (the yardstick), "eager fp32" or "compiled bf16"
    device: str
    batch: int
    views: int
    images_per_second: float  # batch / the median batch's seconds
    mean_images_per_second: float  # images / timed seconds
    seconds: float  # timed seconds
    batches: int  # timed batches
    first_call_s: float  # the first warm-up call: for a compiled model, its compilation

    @property
    def seconds_per_image(self) -> float:
        return 1.0 / self.images_per_second

    def describe(self) -> str:
        return f"{self.mode}, batch {self.batch}, {self.views} pass{'es' if self.views > 1 else ''} per image"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2),
                "mean_images_per_second": round(self.mean_images_per_second, 2),
                "seconds": round(self.seconds, 3), "first_call_s": round(self.first_call_s, 3)}


def views_for(bundle: Any, purpose: str) -> int:
    """Forward passes per image for `purpose` ("query" or "index"): 2 with flip test-time augmentation."""
    return 2 if bundle.preprocessing.flip_for(purpose) else 1


def prepared_model(bundle: Any, device: Any) -> Any:
    """The bundle's network on `device` as the embedder runs it (channels_last, eval; in a process whose allocator
    keeps freed memory for reuse, and whose BLAS runs on one thread: `prepare_process_for_the_model`)."""
    from services.embedder.runtime import Embedder
    from services.wiring import prepare_process_for_the_model

    prepare_process_for_the_model()

    return Embedder(bundle, device=device.type, max_batch=1).model


def measure_forward(model: Any, preprocessing: Any, *, mode: str, batch: int, views: int, device: Any,
                    seconds: float = 5.0, warmup: int = 3, min_batches: int = 3) -> Throughput:
    """Images/s of `predict` on random uint8 images: `warmup` untimed batches, then batches back to back
    for at least `seconds` (and `min_batches`), at the median batch's time. `views` 2 averages each image
    with its mirror, as flip test-time augmentation does; `mode` names the precision ("... fp32": no autocast)."""
    from services.embedder.inference import predict

    if views not in (1, 2):
        raise ValueError(f"views {views}: a bundle embeds an image with 1 pass, or 2 with flip test-time augmentation")
    side = preprocessing.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)

    def forward() -> None:
        predict(model, images, preprocessing=preprocessing, device=device, flip_tta=views == 2,
                bf16=not mode.endswith("fp32"), batch_size=batch)  # predict copies the answer to the host: synced

    started = time.perf_counter()
    forward()
    first_call_s = time.perf_counter() - started
    for _ in range(max(0, warmup - 1)):
        forward()
    durations: list[float] = []
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or len(durations) < min_batches:
        call = time.perf_counter()
        forward()
        durations.append(time.perf_counter() - call)
    return Throughput(mode=mode, device=device.type, batch=batch, views=views,
                      images_per_second=batch / float(np.median(durations)),
                      mean_images_per_second=len(durations) * batch / elapsed, seconds=elapsed,
                      batches=len(durations), first_call_s=first_call_s)


def yardstick(bundle: Any, batch: int, views: int, *, device: Any, seconds: float = 5.0, warmup: int = 3) -> Throughput:
    """The yardstick: the eager bf16 forward of `bundle` at `batch`, `views` passes per image, in images/s."""
    model = prepared_model(bundle, device)
    stick = measure_forward(model, bundle.preprocessing, mode="eager bf16", batch=batch, views=views, device=device,
                            seconds=seconds, warmup=warmup)
    logger.info("yardstick: %s: %.1f images/s", stick.describe(), stick.images_per_second)
    return stick


def load_shipped_bundle(model_dir: Path | None) -> Any:
    from services.embedder.bundle import DEFAULT_BUNDLE_DIR, load_bundle

    return load_bundle(model_dir or DEFAULT_BUNDLE_DIR)


# ---------------------------------------------------------------------------------------------
# Figures, goals and the result file


def figure(name: str, value: float, unit: str, *, yardstick: Throughput | None = None,
           yardstick_value: float | None = None, yardstick_unit: str = "images/s", ratio: float | None = None,
           **details: Any) -> dict[str, Any]:
    """One row of the result's table: `value` in `unit`, and its `ratio` to the yardstick (whose value is
    `yardstick_value` in `yardstick_unit`, its images/s unless said otherwise; `ratio` defaults to
    `value` over its images/s)."""
    row: dict[str, Any] = {"name": name, "value": _round(value), "unit": unit}
    if yardstick is not None:
        row["yardstick"] = {"mode": yardstick.mode, "batch": yardstick.batch, "views": yardstick.views,
                            "value": _round(yardstick.images_per_second if yardstick_value is None
                                            else yardstick_value), "unit": yardstick_unit}
        row["ratio"] = _round(ratio if ratio is not None else value / yardstick.images_per_second)
    return {**row, **details}


def goal(text: str, figure_name: str, ratio: float, *, at_least: float | None = None, at_most: float | None = None,
         also: dict[str, bool] | None = None) -> dict[str, Any]:
    """A goal on `figure_name`'s ratio to the yardstick (`ratio >= at_least` or `ratio <= at_most`); `also`
    names further conditions (e.g. {"0 errors": errors == 0}). Met when all hold."""
    if (at_least is None) == (at_most is None):
        raise ValueError("a goal has one bound: at_least or at_most")
    bound_met = ratio >= at_least if at_least is not None else ratio <= at_most
    conditions = also or {}
    return {"goal": text, "figure": figure_name, "ratio": _round(ratio),
            "target": f"≥ {at_least:g}" if at_least is not None else f"≤ {at_most:g}",
            "conditions": conditions, "met": bool(bound_met and all(conditions.values()))}


def _round(value: float) -> float:
    return float(f"{value:.4g}") if value == value and abs(value) < 1e15 else value


def write_result(name: str, payload: dict[str, Any], *, output_dir: Path = RESULTS_DIR,
                 argv: Sequence[str] | None = None, script: str | None = None) -> Path:
    """`output_dir/<name>.json`: the command (bench/`script`.py, default `name`'s, with `argv`, default this
    process's), commit, machine and busy flag, then `payload` (settings, yardsticks, figures, goals, details);
    printed as a short table."""
    import report  # bench/report.py renders docs/performance.md's table: the same rows here

    argv = sys.argv[1:] if argv is None else argv
    result = {"name": name, "command": " ".join(["python", f"bench/{script or name}.py", *argv]),
              "commit": commit(), "machine": machine(), "busy": bool(payload.get("load", {}).get("busy")),
              **payload}
    result.setdefault("goals", [])
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(report.render_result(result), flush=True)
    print(f"\nwritten to {path}", flush=True)
    return path


# ---------------------------------------------------------------------------------------------
# Command lines and `cbir` subprocesses


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every speed bench has: --quick, --allow-busy, --max-load, --idle-wait, --output-dir,
    --model-dir, --device."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a seconds-long run with small sizes (development)")
    parser.add_argument("--allow-busy", action="store_true",
                        help="record even when the machine is busy; the result then says \"busy\": true")
    parser.add_argument("--max-load", type=float, default=MAX_LOAD,
                        help="the highest 1-minute load average at which to start (default %(default)s)")
    parser.add_argument("--idle-wait", type=float, default=120.0,
                        help="seconds to wait for the load to drop before refusing (default %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                        help="where the JSON result goes (default bench/results)")
    parser.add_argument("--model-dir", type=Path, default=None, help="model bundle (default: the shipped one)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (CBIR_DEVICE; auto: CUDA when present)")
    return parser


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the benches that run `cbir` subprocesses over a collection."""
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="collection root (<split>/<class>/<image>; default: CIFAR-10 as `cbir` finds it)")
    parser.add_argument("--limit-per-class", type=int, default=None,
                        help="index only the first N images of each class (a linked copy; --quick: 5)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                        help="CBIR_COMPILE of the subprocesses (default auto; --quick: off)")


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the benches that serve a FAISS index of the train split: bring one, or keep the one built."""
    parser.add_argument("--index", type=Path, default=None,
                        help="an existing FAISS index file (index.npz) of --data-dir's train split, copied into the "
                             "temporary state dir, instead of building one with `cbir index`")
    parser.add_argument("--save-index", type=Path, default=None, help="keep a copy of the index built here")


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cbir_env(*, model_dir: Path | None, state_dir: Path, device: str, compile: str, **extra: str) -> dict[str, str]:
    """The environment of a `cbir` subprocess: this one's without its CBIR_* settings, then ours."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CBIR_")}
    env.update(CBIR_STATE_DIR=str(state_dir), CBIR_BACKEND="faiss", CBIR_DEVICE=device, CBIR_COMPILE=compile,
               PYTHONUNBUFFERED="1", **extra)
    if model_dir is not None:
        env["CBIR_MODEL_DIR"] = str(model_dir)
    return env


@contextlib.contextmanager
def cbir_process(args: Sequence[str], *, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`cbir <args>` (python -m services.cli) as a subprocess writing to `log`; stopped on the way out
    (SIGTERM, then SIGKILL), whatever happened."""
    with log.open("ab") as output:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=env, cwd=log.parent,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, *, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited in `timeout_s`; only ever the process we started."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def wait_for_status(url: str, *, statuses: Sequence[str], process: subprocess.Popen, log: Path,
                    timeout_s: float) -> float:
    """Poll `url` (a /healthz) until it answers 200 with a `status` among `statuses`; the seconds waited.
    Exits with the log's tail when the process ends or `timeout_s` passes first."""
    started = time.monotonic()
    last: object = None
    while (waited := time.monotonic() - started) < timeout_s:
        if process.poll() is not None:
            raise SystemExit(f"{' '.join(process.args[2:])} exited with {process.returncode} before {url} was "
                             f"{'/'.join(statuses)}:\n{log_tail(log)}")
        try:
            response = httpx.get(url, timeout=5.0)
            last = response.json().get("status", response.status_code)
            if response.status_code == 200 and last in statuses:
                return waited
        except (httpx.HTTPError, ValueError) as exc:
            last = exc
        time.sleep(0.25)
    raise SystemExit(f"{url} was not {'/'.join(statuses)} within {timeout_s:.0f} s (last: {last}):\n{log_tail(log)}")


@contextlib.contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder for state dirs, logs and linked collections, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"cbir-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def linked_collection(source: Path, target: Path, *, split: str, per_class: int) -> Path:
    """`target/<split>/<class>/` holding the first `per_class` images of each class of `source` as hard
    links (copies across file systems): `cbir index` has no limit of its own."""
    from services.common.collection import iter_images

    taken: dict[str, int] = {}
    for image in iter_images(source, split):
        if taken.get(image.label, 0) >= per_class:
            continue
        taken[image.label] = taken.get(image.label, 0) + 1
        destination = target / image.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / image.path, destination)
        except OSError:
            shutil.copyfile(source / image.path, destination)
    return target


def count_images(root: Path, split: str) -> int:
    from services.common.collection import iter_images

    return sum(1 for _ in iter_images(root, split))


def collection_for(data_dir: Path | None, work: Path, *, split: str, per_class: int | None) -> tuple[Path, int]:
    """The collection root to index (`data_dir`, else CIFAR-10 where `cbir` finds it; linked down to
    `per_class` images a class under `work` when given) and how many images its `split` holds."""
    from services.common.collection import find_data_dir

    root = find_data_dir(data_dir)
    if per_class:
        root = linked_collection(root, work / "collection", split=split, per_class=per_class)
    return root, count_images(root, split)
